"""Atomic outputs. A run builds its folder under a temporary name and moves it into place only when
complete, so a crash never leaves a half-written result where a result is expected."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.checkpoint.run_folder import RunFolder
from engine.errors import OutputError


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, to write over a folder that already holds something."""
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(
            f"output_dir {str(out)!r} already holds results; choose another output_dir or pass overwrite=true "
            "(the old folder is replaced only once the new run has completed)"
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
    base_model: str | None,
    forget: dict | None,
    method: dict,
    metrics: dict,
    metrics_heading: str = "Metrics (errors and attacks in percent)",
) -> str:
    """A Hugging Face model card (README.md) that records what was forgotten and how."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- machine-unlearning",
        f"- {method.get('name', 'model')}",
    ]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {title}", ""]
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
    return "\n".join(lines) + "\n"


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


def save_checkpoint(model, path: Path, processor, card: str, record: dict, state_dict=None) -> None:
    """Save ``model`` as a Hugging Face checkpoint (safetensors) with its processor (an image processor
    or a tokenizer: anything with ``save_pretrained``), a model card and ``unlearning.json`` (the
    machine-readable record). ``state_dict``: the weights to write when the module's own are sharded
    (ZeRO-3's gathered ones)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    (tmp / "unlearning.json").write_text(json.dumps(record, indent=2, default=str))
    if path.exists():
        raise OutputError(f"{path} exists already inside a fresh run folder")
    os.replace(tmp, path)
