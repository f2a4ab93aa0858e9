"""`unlearn audit`: the NeurIPS 2023 Machine Unlearning Challenge's evaluation as one command.

Reads top to bottom: check inputs -> find cached references -> one Ray task per model still to make
(K retrained references on D_r, K models on D for LiRA, K unlearnings of model.path with seeds
audit.seed + i) -> per forget example, the statistic s = log p_y - log(1 - p_y) of every model ->
epsilon per example, the challenge score, LiRA -> ``audit.json``, ``audit.md`` and a histogram plot.

References are trained from scratch with ``cfg.train`` (the recipe `unlearn train` made the Original
with), so model.arch must be set. They depend on the data, the forget set and that recipe, not on the
method: they are cached under ``audit.cache_dir`` and a second audit (another method) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from engine.config import RunConfig
from engine.errors import ConfigError
from engine.eval.audit import score
from engine.eval.audit_report import plot_epsilons, render
from engine.io import json_safe, write_text_atomic
from engine.recipes.session import Session

# kind -> (`unlearn train` target it runs, what it is)
REFERENCES = {"retrain": ("retrain", "trained on D_r"), "original": ("original", "trained on D (LiRA's IN)")}


def _absolute(spec: str) -> str:
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec  # a hub id stays as given


def reference_key(cfg: RunConfig, forget: dict) -> tuple[str, dict]:
    """What a reference model depends on: data, forget (and given retain) set, architecture and recipe."""
    recipe = {
        "data": {**cfg.data.model_dump(mode="json"), "dataset": _absolute(cfg.data.dataset)},
        "forget_ids_sha256": forget["ids_sha256"],
        "retain_ids_sha256": forget.get("retain_ids_sha256"),
        "arch": cfg.model.arch,
        "width": cfg.model.width,
        "train": cfg.train.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16], recipe


def _task(item: dict) -> dict:
    """One model (a Ray task): make it, then score it on the forget set. Runs in a worker process."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    from engine.data.vision import prepare_data
    from engine.recipes.train import run_training
    from engine.recipes.unlearn import run_unlearning

    hf_logging.disable_progress_bar()  # a task's output reaches the driver's console: no per-file bars
    datasets.disable_progress_bars()
    os.chdir(item["cwd"])  # relative paths of the config resolve as on the driver
    torch.set_num_threads(1)  # one CPU per task
    cfg = RunConfig.model_validate(item["cfg"])
    kind = item["kind"]
    quiet = lambda _msg: None  # noqa: E731  (the audit logs per model, not per epoch)
    if kind == "unlearn":
        out = run_unlearning(cfg, log=quiet)
        report = json.loads((out / "report.json").read_text())
        rewound = report.get("rewound")  # an earlier epoch the method chose (SCRUB+R): the model it audits
        model_dir = out / ("model_rewound" if rewound else "model")
        metrics = rewound["metrics"] if rewound else report["metrics"]
    else:
        target = REFERENCES[kind][0]
        out = run_training(cfg, targets=(target,), log=quiet)
        model_dir = out / target
        report = json.loads((model_dir / "report.json").read_text())
        metrics = report["metrics"]
    data = prepare_data(cfg.data, cfg.forget)
    stats = {
        "kind": kind,
        "seed": cfg.seed,
        "model": str(model_dir),
        "forget_ids": list(data.forget.ids),
        "margin": forget_margins(cfg, data, str(model_dir)).tolist(),
        "forget_acc": 1 - metrics["forget_error"] / 100,
        "retain_acc": 1 - metrics["retain_error"] / 100,
        "test_acc": 1 - metrics["test_error"] / 100,
        "seconds": report["train_seconds"],
    }
    if kind != "unlearn":  # the cache entry is complete only once its stats exist
        write_text_atomic(Path(cfg.output_dir) / "stats.json", json.dumps(json_safe(stats)))
    return stats


def forget_margins(cfg: RunConfig, data, model_dir: str) -> np.ndarray:
    """s = log p_y - log(1 - p_y) of the classifier in ``model_dir`` on each forget example (eval mode, CPU)."""
    from engine.eval.metrics import predict
    from engine.models.loading import load_classifier
    from engine.tasks.image_classification import load_data_and_transform

    _, _, transform = load_data_and_transform(cfg, model_dir)
    model = load_classifier(model_dir, data.num_labels)
    return predict(model, data.forget, transform, cfg.eval.batch_size, "cpu")["margin"].astype(float)


def _item(cfg: RunConfig, kind: str, seed: int, output_dir: Path) -> dict:
    """One task: the config of one model, quiet, and evaluated only at the end (SCRUB+R and SCRUB's calibrated
    schedule excepted: they pick an epoch, or decide the next one's max-steps, from per-epoch errors)."""
    per_epoch = kind == "unlearn" and cfg.method.every_epoch_reason() is not None
    run_cfg = cfg.model_copy(
        update={
            "seed": seed,
            "output_dir": str(output_dir),
            "overwrite": True,
            "logging": cfg.logging.model_copy(update={"progress": False, "wandb": False}),
            "eval": cfg.eval.model_copy(update={"reference": None, "every_epoch": bool(per_epoch)}),
        }
    )
    return {"kind": kind, "seed": seed, "cwd": os.getcwd(), "cfg": run_cfg.model_dump(mode="json")}


def run_audit(cfg: RunConfig, log=print) -> Path:
    from engine.data.vision import prepare_data

    t_start = time.perf_counter()
    a = cfg.audit
    session = Session(cfg, "audit", log, with_backend=False)  # its models train in Ray tasks of their own
    log = session.log
    data = prepare_data(cfg.data, cfg.forget)
    key, recipe = reference_key(cfg, data.forget_summary())
    cache = Path(a.cache_dir or Path(cfg.model.path).resolve().parent / "audit_references") / key
    cache.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache / "recipe.json", json.dumps(recipe, indent=2))
    seeds = [a.seed + i for i in range(a.k)]
    lira = a.lira and a.k >= 3  # a retrained model is scored by the other K-1: a variance needs two
    kinds = ["retrain"] + (["original"] if lira else [])
    if a.lira and not lira:
        log("LiRA skipped: it needs audit.k >= 3 (each retrained model is scored against the other K-1)")
    log(
        f"audit of {cfg.method.name} on {data.description} ({len(data.forget)} forget examples): K={a.k} "
        f"per side, seeds {seeds[0]}..{seeds[-1]}; references in {cache}"
    )

    with session.stage() as stage:
        cached, items = {}, []
        for kind in kinds:
            for s in seeds:
                folder = cache / f"{kind}_seed{s}"
                if (folder / "stats.json").is_file():
                    cached[(kind, s)] = json.loads((folder / "stats.json").read_text())
                else:
                    items.append(_item(cfg, kind, s, folder))
        items += [_item(cfg, "unlearn", s, stage / "unlearned" / f"seed_{s}") for s in seeds]
        log(f"{len(cached)} references reused from the cache, {len(items)} models to make as Ray tasks")
        from engine.launch.ray_tasks import fan_out

        t_tasks = time.perf_counter()
        made = fan_out(_task, items, num_cpus=a.num_cpus, address=a.ray_address)
        tasks_seconds = time.perf_counter() - t_tasks
        models = {(m["kind"], m["seed"]): m for m in made} | cached
        for m in models.values():
            if m["forget_ids"] != list(data.forget.ids):
                raise ConfigError(f"{m['model']} was scored on another forget set; delete {cache} and rerun")
        # the Original's own s: whether what separates the unlearned models was already there before unlearning
        original = forget_margins(cfg, data, str(cfg.model.path))
        result = score(models, seeds, kinds, data.forget.ids, a, original)
        result.update(
            method=cfg.method.model_dump(mode="json"),
            forget=data.forget_summary(),
            model_path=cfg.model.path,
            cache={"dir": str(cache), "reused": len(cached), "trained": len(items) - a.k},
            seconds={
                "tasks_wall": tasks_seconds,
                "total": time.perf_counter() - t_start,
                **result["seconds"],
            },
        )
        write_text_atomic(stage / "audit.json", json.dumps(json_safe(result), indent=2))
        plot_epsilons(stage / "epsilon_histogram.png", result)
        write_text_atomic(stage / "audit.md", render(result))
    out = session.close()
    log(
        f"score {result['score']:.4f} (forgetting quality {result['forgetting_quality']:.4f} x retain ratio "
        f"{result['retain_ratio']:.3f} x test ratio {result['test_ratio']:.3f}); report in {out / 'audit.md'}"
    )
    return out
