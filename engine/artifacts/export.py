"""Atomic outputs. A run builds its folder under a temporary name and moves it into place only when
complete, so a crash never leaves a half-written result where a result is expected."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from engine.artifacts.run_folder import RunFolder
from engine.errors import OutputError

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output folder that cannot be made (a file in the way, a folder that cannot
    be written) or that already holds something."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output_dir {str(out)!r} is a file, not a folder: choose another output_dir")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"output_dir {str(out)!r} already holds results; choose another output_dir or pass overwrite=true "
            "(the old folder is replaced only once the new run has completed)"
        )
    # the run writes OUTPUT.partial beside OUTPUT and renames it: the first existing ancestor must be a folder
    # this user can write into (os.access answers for the user: root writes where the mode bits say no)
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"output_dir {str(out)!r} cannot be created: {str(parent)!r} is a file, not a folder; "
            "choose another output_dir"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"output_dir {str(out)!r} cannot be created: {str(parent)!r} is not writable; choose another output_dir"
        )
    return out


@contextmanager
def staged_dir(output_dir: str | Path, overwrite: bool, backend=None, resume: bool = False) -> Iterator[Path]:
    """Yield a staging folder ``<output_dir>.partial``; on success it replaces ``output_dir``. On failure
    the staging folder is left for inspection (and, when it holds a checkpoint, for ``resume``) and
    ``output_dir`` is untouched. With several processes (``backend``) only the main one creates and
    moves folders; the others wait for it."""
    main = backend is None or backend.is_main
    out = check_output_dir(output_dir, overwrite)
    stage = RunFolder(out).partial
    if main:
        if stage.exists() and not resume:
            shutil.rmtree(stage)  # a previous failed attempt with nothing to resume from
        stage.mkdir(parents=True, exist_ok=True)
    if backend is not None:
        backend.barrier()
    yield stage
    if backend is not None:
        backend.barrier()  # every process has finished writing into the stage
    if main:
        if out.exists():
            old = RunFolder(out).old
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(stage, out)
            shutil.rmtree(old)
        else:
            os.replace(stage, out)
    if backend is not None:
        backend.barrier()


def model_card(
    title: str,
    forget: dict | None,
    method: dict,
    metrics: dict,
    metrics_heading: str = "Metrics (errors and attacks in percent)",
    *,
    model_name: str,
    task_type: str,
    tags: list[str],
    base_model: str | None = None,
    datasets: list[str] | None = None,
    eval_dataset: str | None = None,
    eval_dataset_revision: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """A Hugging Face model card (README.md) that records what was forgotten and how: huggingface_hub's
    ``ModelCardData`` (``base_model`` a hub id or absent, the hub ``datasets``, ``license``, ``library_name``,
    ``tags``, and ``metrics`` as model-index results under ``model_name``), then a human-readable body.
    ``task_type``: the hub task (image-classification, text-generation); ``eval_dataset``: the data the
    metrics were measured on (a hub id, or a local path: named by its folder or file name) and
    ``eval_dataset_revision`` the commit it was read at (a hub id read from the hub)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset = (
        eval_dataset if eval_dataset is None or not Path(eval_dataset).exists() else Path(eval_dataset).name
    )
    results = [
        EvalResult(task_type=task_type, dataset_type=dataset, dataset_name=dataset, metric_type=k,
                   metric_value=float(v), metric_name=k.replace("_", " "), dataset_revision=eval_dataset_revision)
        for k, v in metrics.items()
        if dataset and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]  # fmt: skip
    data = ModelCardData(
        base_model=base_model or None,
        datasets=list(datasets) if datasets else None,
        license=license or None,
        library_name="transformers",
        pipeline_tag=task_type,
        tags=list(dict.fromkeys(tags)),
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    lines = [f"# {title}", ""]
    if forget:
        lines += [
            "## What was forgotten",
            "",
            f"- How the forget set was chosen: {forget['description']} (kind `{forget['kind']}`)",
            f"- Size: {forget['size']} examples",
            f"- sha256 of the sorted example ids: `{forget['ids_sha256']}`",
            "",
        ]
    lines += ["## Method and settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in method.items()]
    lines += ["", f"## {metrics_heading}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def run_card(
    cfg,
    path: Path,
    model_path: str | None,
    title: str,
    forget: dict | None,
    settings: dict,
    metrics: dict,
    metrics_heading: str,
    *,
    task_type: str,
    sources: list[str | None],
    target: str | None = None,
) -> ModelCard:
    """The card of a model a run exports to ``path`` (a folder of the staged run): ``model_path`` is the model it
    started from (None: built from scratch), ``sources`` the data as the config names it (paths or hub ids; the
    first is the data the metrics were measured on), ``target`` the model `unlearn train` made."""
    from engine import provenance

    base = model_path if model_path and not provenance.is_local(model_path) else None
    revision = provenance.model_revision(model_path, cfg.model.revision) if model_path else None
    push = getattr(getattr(cfg, "output", None), "push_to_hub", None)
    # model-index needs a name: the repository it is pushed to, else the run folder's and this model's names
    name = push if push and path.name == "model" else f"{Path(cfg.output_dir).name}-{path.name}"
    tags = ["machine-unlearning", str(settings.get("name", "model"))] + ([target] if target else [])
    return model_card(
        title, forget, settings, metrics, metrics_heading, model_name=name, task_type=task_type, tags=tags,
        base_model=base, datasets=provenance.hub_ids(*sources), eval_dataset=sources[0],
        eval_dataset_revision=provenance.dataset_revision(sources[0]) if sources[0] else None,
        license=card_license(model_path, revision),
    )  # fmt: skip


def card_license(model_path: str | None, revision: str | None = None) -> str | None:
    """The license the input model's own card declares, which a model derived from it inherits: read from the
    README.md of a local folder, or of the hub repository at ``revision`` (the cache, or the hub). None when
    unknown: a license is a legal statement about the weights, so the card leaves it out rather than guess one."""
    if not model_path:
        return None
    from huggingface_hub import ModelCard, hf_hub_download

    try:
        readme = Path(model_path) / "README.md"
        if not Path(model_path).is_dir() and revision:
            # the card at the commit the run read, not whatever the branch holds now
            readme = Path(hf_hub_download(model_path, "README.md", revision=revision))
        card = ModelCard.load(readme) if readme.is_file() else None
    except Exception:  # no card, no hub, a card that does not parse: the license is unknown, nothing more
        return None
    value = getattr(card.data, "license", None) if card is not None else None
    return value if isinstance(value, str) and value else None


def image_processor(image: dict):
    """A plain processor any HF user can load with AutoImageProcessor: rescale + normalise (+ resize)."""
    from transformers import ViTImageProcessorPil as ViTImageProcessor  # no torchvision needed

    size = image.get("size")
    return ViTImageProcessor(
        do_resize=size is not None,
        size={"height": size, "width": size} if size else None,
        image_mean=image["mean"],
        image_std=image["std"],
    )


def save_checkpoint(
    model, path: Path, processor, card: ModelCard | str, record: dict, state_dict=None
) -> None:
    """Save ``model`` as a Hugging Face checkpoint (safetensors) with its processor (an image processor
    or a tokenizer: anything with ``save_pretrained``), a model card and ``unlearning.json`` (the
    machine-readable record). ``state_dict``: the weights to write when the module's own are sharded
    (ZeRO-3's gathered ones).

    A LoRA student (a peft model, engine/models/lora.py) is written as ``record["lora"]["export"]`` says:
    ``merged`` (the default, also when the record has no ``lora`` entry) the plain model with the adapters
    folded in, ``adapter`` the adapter alone; the record and the card then say which (``lora_summary``)."""
    from engine.models.lora import is_lora, loader_class, lora_summary, save_lora

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if is_lora(model):
        lora = {**lora_summary(model), **(record.get("lora") or {})}
        record = {**record, "lora": lora}
        card = lora_card(card, lora, loader_class(model))
        save_lora(model, tmp, lora["export"], state_dict)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(str(card))
    (tmp / "unlearning.json").write_text(json.dumps(record, indent=2, default=str))
    if path.exists():
        raise OutputError(f"{path} exists already inside a fresh run folder")
    os.replace(tmp, path)


def lora_card(card: ModelCard | str, lora: dict, auto_class: str = "AutoModel") -> ModelCard | str:
    """``card`` with a section on the LoRA student it describes: its settings, how much of the model trained,
    and what the folder holds (the merged model, or the adapter and how to load it over its base). An adapter
    card names peft as its library (the hub then offers peft's loading snippet); ``auto_class``: the transformers
    class that loads the base."""
    share = lora["trainable_parameters"] / max(lora["total_parameters"], 1)
    targets = lora["target_modules"]
    lines = [
        "",
        "## LoRA student",
        "",
        f"Unlearned with low-rank adapters (rank {lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']}) "
        f"on {targets if isinstance(targets, str) else ', '.join(targets)} ({lora['adapted_modules']} modules): "
        f"{lora['trainable_parameters']:,} of {lora['total_parameters']:,} parameters trained ({share:.2%}); the "
        "teacher was the same base weights with the adapters disabled.",
        "",
    ]
    if lora["export"] == "merged":
        lines.append(
            "Export: **merged**. The adapters are folded into the base weights: this folder is a plain checkpoint."
        )
    else:
        base = lora.get("base_model") or "BASE_MODEL"
        lines += [
            f"Export: **adapter**. This folder holds the adapter only (adapter_model.safetensors); load it over "
            f"its base model `{base}`:",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            *(
                ["import engine.models.vision  # registers the CIFAR networks' classes"]
                if auto_class == "AutoModelForImageClassification"
                else []
            ),
            "",
            f'model = PeftModel.from_pretrained({auto_class}.from_pretrained("{base}"), "THIS_FOLDER")',
            "```",
        ]
    text = "\n".join(lines) + "\n"
    if isinstance(card, str):
        return card.rstrip("\n") + "\n" + text
    from huggingface_hub import ModelCard

    out = ModelCard(card.content)  # a copy: the caller's card is left as it was
    out.data.tags = list(dict.fromkeys([*(out.data.tags or []), "lora"]))
    if lora["export"] == "adapter":
        out.data.library_name = "peft"
    out.text = out.text.rstrip("\n") + "\n" + text
    return out
