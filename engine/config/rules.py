"""Every refusal of a config that needs no model, in one place, before any work.

- ``check_sections(cfg)``: the rules between sections, whatever the command (a method the task cannot serve, data
  the task cannot read, the method's own rules: ``check_run`` of its settings); pydantic runs it whenever a run
  config is validated, so a config that breaks one never exists.
- ``check(cfg, command)``: what one command needs beyond that (a task and backend it serves, the extras they
  import, the model it starts from, a method that fits the backend), run by the CLI before it launches anything and
  by each recipe's session as it starts.

Only the checks that need a loaded model stay where the model is: a ``k`` beyond its blocks (the method's
``check``), no LoRA target matched (engine/models/lora.py), a vocabulary the tokenizer does not fit (the task's).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import ConfigError
from engine.methods import METHODS

if TYPE_CHECKING:
    from engine.config.schema import RunConfig

# names the configs of earlier versions used: still read, as these
ALIASES = {"vision": "image_classification", "tofu": "causal_lm"}

# What each task gives a method (each method's ``needs``; the tasks themselves are engine/tasks).
PROVIDES: dict[str, tuple[str, ...]] = {
    "image_classification": ("teacher", "paired", "classifier_head"),
    "causal_lm": ("teacher", "paired", "idk"),
}
NEEDS = {
    "teacher": "a frozen teacher",
    "paired": "a paired forget+retain stream",
    "classifier_head": "a classifier head (class logits it edits or reads per class)",
    "idk": 'an "I don\'t know" answer to each forget question (text prompt/answer pairs)',
}

ALL = ("single", "deepspeed", "ray")
# command -> task -> the backends it runs on (a task absent: the command does not serve it)
COMMANDS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"image_classification": ("single", "deepspeed"), "causal_lm": ("single", "deepspeed")},
    "run": {"image_classification": ALL, "causal_lm": ALL},
    "eval": {"image_classification": ALL, "causal_lm": ALL},
    # the audit's K unlearnings and K retrains are Ray tasks of one process each (audit.ray_address)
    "audit": {"image_classification": ("single",)},
}

# What an optional dependency serves -> (the modules it needs, the extra that installs them: pyproject.toml).
EXTRAS = {
    "backend.name=deepspeed": (("deepspeed",), "deepspeed"),
    "backend.name=ray": (("ray", "deepspeed"), "ray"),
    "`unlearn audit`": (("ray",), "ray"),
    "logging.wandb=true": (("wandb",), "wandb"),
}


def train_targets(cfg: RunConfig) -> tuple[str, ...]:
    """The models `unlearn train` makes, in order, the reference first where the others are scored against it:
    an image classifier's Original (on D) and Retrain (on D_r); a causal LM's retain model (TOFU) or Retrain, then
    its Original."""
    if cfg.task == "image_classification":
        return ("original", "retrain")
    return ("retain", "original") if cfg.data.preset == "tofu" else ("retrain", "original")


def check_sections(cfg: RunConfig) -> None:
    """The rules between sections (ValueError, one line each: the loader prints it as the config's error)."""
    provides = PROVIDES[cfg.task]
    missing = [n for n in METHODS[cfg.method.name][1].needs if n not in provides]
    if missing:
        served = [name for name, (_, m) in METHODS.items() if name != "erm" and set(m.needs) <= set(provides)]
        raise ValueError(
            f"method={cfg.method.name} needs {' and '.join(NEEDS[n] for n in missing)}, which task={cfg.task} "
            f"does not provide; with task={cfg.task} use one of {', '.join(served)}"
        )
    if cfg.task == "image_classification" and cfg.model.gradient_checkpointing:
        raise ValueError(
            "model.gradient_checkpointing is for causal LMs (task=causal_lm): unset it for image classifiers"
        )
    # refused here, not only when `unlearn request process` reaches the N-th version's job
    if cfg.task == "causal_lm" and cfg.ledger.retrain_every:
        raise ValueError(
            "ledger.retrain_every makes a version with method=retrain, which serves image classifiers only: "
            "unset ledger.retrain_every for task=causal_lm"
        )
    if cfg.task == "causal_lm" and getattr(cfg.method, "augment", False):  # a field of the image methods only
        raise ValueError("method.augment (random crops and flips) is for images: set method.augment=false")
    cfg.method.check_run(cfg)  # the method's own rules (engine/methods: SCRUB's schedule, SCRUB+R on text)
    _data_fits_task(cfg)


def _data_fits_task(cfg: RunConfig) -> None:
    d, f = cfg.data, cfg.forget
    text_columns = [k for k in ("text_column", "prompt_column", "answer_column") if getattr(d, k)]
    if cfg.task == "image_classification":
        if d.preset is not None:
            raise ValueError(f"data.preset={d.preset} holds text: set task=causal_lm, or unset data.preset")
        if text_columns or f.kind in ("where", "dataset"):
            what = ", ".join(f"data.{k}" for k in text_columns) or f"forget.kind={f.kind}"
            raise ValueError(f"{what} is for text data: set task=causal_lm")
        return
    if d.preset == "tofu":
        if text_columns:
            raise ValueError(
                "data.preset=tofu has its own columns: unset " + ", ".join(f"data.{k}" for k in text_columns)
            )
        if f.kind not in ("class", "ids"):
            raise ValueError(f"TOFU forgets its forget-split authors (forget.kind=class) or rows by id (forget.kind=ids), "
                             f"not forget.kind={f.kind}")  # fmt: skip
        return
    if d.preset == "muse":
        if text_columns:
            raise ValueError(
                "data.preset=muse reads MUSE's articles: unset "
                + ", ".join(f"data.{k}" for k in text_columns)
            )
        if f.kind not in ("class", "ids"):
            raise ValueError(f"MUSE forgets its forget articles (forget.kind=class, muse.forget_subset for the first N) or "
                             f"articles by index (forget.kind=ids), not forget.kind={f.kind}")  # fmt: skip
        return
    if d.text_column and (d.prompt_column or d.answer_column):
        raise ValueError(
            "data.text_column (raw documents, loss on every token) and data.prompt_column / data.answer_column "
            "(pairs, loss on the answer) are two ways to read rows: set one of them"
        )
    if not d.text_column and not (d.prompt_column and d.answer_column):
        raise ValueError(
            "task=causal_lm reads data.dataset as raw documents (data.text_column=COLUMN) or prompt/answer pairs "
            "(data.prompt_column and data.answer_column), or TOFU (data.preset=tofu): name the columns"
        )
    if f.kind in ("class", "selective"):
        raise ValueError(
            f"forget.kind={f.kind} needs labels: for text use ids, ids_file, where, random or dataset"
        )
    if f.kind == "where" and not f.where:
        raise ValueError(
            "forget.kind=where needs forget.where (column: value), e.g. forget.where={author: X}"
        )
    if f.kind == "dataset" and not f.dataset:
        raise ValueError(
            "forget.kind=dataset needs forget.dataset: the file or hub id holding the forget rows"
        )


def require_extras(command: str, cfg: RunConfig) -> None:
    """Refuse a config that needs an optional dependency not installed."""
    asked = [
        ("backend.name=" + cfg.backend.name) if cfg.backend.name != "single" else None,
        "`unlearn audit`" if command == "audit" else None,
        "logging.wandb=true" if cfg.logging.wandb else None,
    ]
    for use in filter(None, asked):
        modules, extra = EXTRAS[use]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            how = (
                " (after torch: DS_BUILD_OPS=0 pip install --no-build-isolation ...)"
                if "deepspeed" in missing
                else ""
            )
            raise ConfigError(
                f"{use} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                f"pip install 'engine[{extra}]'{how}"
            )


def check(cfg: RunConfig, command: str, targets: tuple[str, ...] | None = None) -> None:
    """Refuse, in one line and before any work, what ``command`` cannot do with ``cfg`` (``targets``: `unlearn
    train --only`). ``command``: train, run, eval, audit, or request (`unlearn request process`)."""
    if command in COMMANDS:
        served = COMMANDS[command]
        backends = served.get(cfg.task)
        if backends is None:
            raise ConfigError(
                f"`unlearn {command}` runs with task={' or task='.join(served)}, not task={cfg.task}"
            )
        if cfg.backend.name not in backends:
            others = [c for c, r in COMMANDS.items() if cfg.backend.name in r.get(cfg.task, ())]
            raise ConfigError(
                f"`unlearn {command}` of task={cfg.task} runs on backend.name={' or '.join(backends)}; "
                f"backend.name={cfg.backend.name} runs `unlearn {'|'.join(others) or '(no command)'}` of task={cfg.task}"
            )
        require_extras(command, cfg)
    m = cfg.model
    if command == "train":
        names = train_targets(cfg)
        unknown = [t for t in targets or () if t not in names]
        if unknown:
            raise ConfigError(
                f"unknown train targets {unknown}; with task={cfg.task} choose from {', '.join(names)}"
            )
        if m.path is None and m.arch is None:
            raise ConfigError(
                "`unlearn train` needs model.arch (e.g. preact_resnet18) or model.path, the checkpoint to fine-tune"
            )
    needed = {
        "run": "`unlearn run` needs model.path: the checkpoint to unlearn (e.g. runs/cifar5-train/original)",
        "eval": "`unlearn eval` needs model.path: the checkpoint to score",
        "audit": "`unlearn audit` needs model.path: the Original to unlearn K times",
        "request": "`unlearn request process` needs model.path: the Original the first version unlearns",
    }
    if command in needed and m.path is None:
        raise ConfigError(needed[command])
    if cfg.task == "causal_lm" and (m.path is None or command == "train" and m.arch is not None):
        raise ConfigError("task=causal_lm needs model.path: the causal LM (a folder or a hub id)")
    if command in ("run", "audit", "request"):
        _method_fits(cfg, command)
    if command == "run":
        check_push(cfg.output.push_to_hub)
    if command == "audit":
        if m.arch is None:
            raise ConfigError(
                "`unlearn audit` trains the retrained references from scratch: set model.arch (and model.width) as "
                "in the `unlearn train` that made model.path"
            )
        if not Path(m.path).exists():
            raise ConfigError(f"model.path {m.path!r} does not exist: run `unlearn train` first")
    if command == "request":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and cfg.backend.name != "deepspeed":
            raise ConfigError("under a multi-process launcher `unlearn request process` needs backend.name=deepspeed "
                              "(every rank runs the version's job); for Ray workers start it as one process with "
                              "backend.name=ray")  # fmt: skip
        if cfg.ledger.retrain_bound is not None and cfg.task != "image_classification":
            raise ConfigError("ledger.retrain_bound measures drift on image_classification (forgotten_val_error); "
                              "use ledger.retrain_every for other tasks")  # fmt: skip


def _method_fits(cfg: RunConfig, command: str) -> None:
    """The method against the run's evaluation and backend. The audit turns per-epoch evaluation on itself where
    the method needs it (its unlearnings), so only `run` and request processing refuse it off."""
    why = cfg.method.every_epoch_reason()
    if why and not cfg.eval.every_epoch and command != "audit":
        raise ConfigError(why)
    if not METHODS[cfg.method.name][1].prepares_student:
        return
    # `prepare` (re-initialise, freeze, perturb) changes the whole model in each process: not a LoRA student, and
    # not under ZeRO-3, which shards it
    if cfg.model.lora is not None:
        raise ConfigError(
            f"method={cfg.method.name} re-initialises or edits the whole model before training, which a LoRA "
            "student cannot: unset model.lora for it"
        )
    if cfg.backend.name in ("deepspeed", "ray") and zero_stage(cfg.backend) == 3:
        raise ConfigError(
            f"method={cfg.method.name} changes the whole model outside the training steps, which ZeRO-3 shards: "
            "use backend.zero_stage=2 (or 0/1) for it"
        )


def zero_stage(backend) -> int:
    """The ZeRO stage a DeepSpeed run takes: backend.zero_stage, else its JSON's (the JSON's own refusals:
    engine/config/deepspeed.py)."""
    from engine.config.deepspeed import build_ds_config

    return build_ds_config(backend, world_size=1)["zero_optimization"]["stage"]


def check_push(repo_id: str | None) -> None:
    """Refuse, before any work, a push that cannot happen: an invalid repository id, no token, the hub forbidden."""
    if not repo_id:
        return
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"output.push_to_hub={repo_id!r} is not a hub repository id: use owner/name (e.g. you/scrub-cifar10)"
        ) from None
    if "/" not in repo_id:
        raise ConfigError(
            f"output.push_to_hub={repo_id!r} names no owner: use owner/name (your user or organisation name)"
        )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"output.push_to_hub={repo_id!r} needs the hub, but HF_HUB_OFFLINE is set: unset it, or drop "
            "output.push_to_hub and upload the model later with `hf upload`"
        )
    if get_token() is None:
        raise ConfigError(
            f"output.push_to_hub={repo_id!r} needs a hub token: run `hf auth login` or set HF_TOKEN"
        )
