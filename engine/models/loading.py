"""Loading and building classifiers. Hugging Face checkpoints go through
``AutoModelForImageClassification`` (local folder or hub id, safetensors only, remote code off
unless asked for); the paper's CIFAR nets are registered with the Auto classes so they load the
same way."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_weights(path: str, auto_class: str) -> None:
    """Refuse a local checkpoint folder whose weights exist only as pickle files (pytorch_model.bin,
    *.pt, *.pth): unpickling runs whatever code the file holds, so the engine never does it for a file
    it did not write. The message says how to convert it once, in a session the user trusts."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{path!r} holds only pickle weights ({', '.join(pickles[:3])}): the engine loads safetensors only "
            "and does not unpickle files it did not write (unpickling can run arbitrary code). If you trust the "
            f"file, convert it once in a trusted session: `{auto_class}.from_pretrained(PATH)"
            ".save_pretrained(OUT, safe_serialization=True)`, then set model.path=OUT"
        )


def safetensors_hint(exc: Exception) -> str:
    """For a hub checkpoint without safetensors (transformers' error names the missing file)."""
    if "safetensors" not in str(exc):
        return ""
    return (
        " (the engine loads safetensors only and does not unpickle pytorch_model.bin / *.pt files: use a "
        "revision that has model.safetensors, or convert the checkpoint in a trusted session with "
        "save_pretrained(OUT, safe_serialization=True))"
    )


def _auto():
    from transformers import AutoModelForImageClassification

    import engine.models.vision  # noqa: F401  (registers the CIFAR nets with the Auto classes)

    return AutoModelForImageClassification


def load_classifier(path: str, num_labels: int, revision: str | None = None, trust_remote_code: bool = False):
    """Load an image classifier and check that it predicts ``num_labels`` classes."""
    if trust_remote_code and not revision:
        raise ModelError(
            "model.trust_remote_code=true runs the checkpoint's own Python code: pin it with model.revision=<commit>"
        )
    refuse_pickle_weights(path, "AutoModelForImageClassification")
    auto = _auto()
    try:
        model = auto.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as exc:
        hint = "" if Path(path).exists() else " (it is not a local folder; hub ids need a network)"
        hint += safetensors_hint(exc)
        raise ModelError(f"cannot load a classifier from {path!r}{hint}: {exc}") from exc
    except ValueError as exc:
        raise ModelError(f"{path!r} is not an image-classification checkpoint: {exc}") from exc
    if model.config.num_labels != num_labels:
        raise ModelError(
            f"the checkpoint {path!r} predicts {model.config.num_labels} classes but the data has {num_labels}; "
            "use the checkpoint trained on this data, or set data.classes to the classes it was trained on"
        )
    return model


def build_classifier(arch: str, num_labels: int, width: float, class_names: list[str]):
    """A from-scratch CIFAR-scale net (pre-activation ResNet-18 or All-CNN) as a HF model."""
    from engine.models.vision import build_vision_model

    model = build_vision_model(arch, num_labels=num_labels, width=width)
    model.config.id2label = dict(enumerate(class_names))
    model.config.label2id = {n: i for i, n in enumerate(class_names)}
    return model


def image_settings(path: str | None, mean: list[float], std: list[float], size: int | None) -> dict:
    """Normalisation of a checkpoint: from its image processor when it has one, else the given."""
    if path is not None:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(path)
            size_cfg = getattr(proc, "size", None) or {}
            side = (
                size_cfg.get("height") or size_cfg.get("shortest_edge")
                if isinstance(size_cfg, dict)
                else None
            )
            return {
                "mean": list(proc.image_mean),
                "std": list(proc.image_std),
                "size": side if getattr(proc, "do_resize", False) else size,
            }
        except (OSError, ValueError, AttributeError):
            pass  # no preprocessor_config.json: the data section's normalisation applies
    return {"mean": list(mean), "std": list(std), "size": size}


def classifier_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The adapter the loop calls: a batch in, class logits out."""
    return model(pixel_values=batch["pixel_values"]).logits
