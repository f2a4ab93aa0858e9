"""Loading and building classifiers. Hugging Face checkpoints go through
``AutoModelForImageClassification`` (local folder or hub id, safetensors only, remote code off
unless asked for); the paper's CIFAR nets are registered with the Auto classes so they load the
same way."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine import provenance
from engine.errors import ModelError, first_line

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


def resolve_model(path: str, revision: str | None = None, what: str = "model.path") -> str | None:
    """Check, before any work, that ``path`` names a model that can be read, and record where it comes from
    (engine/provenance.py). A local folder is returned ``revision`` as given; a hub id is resolved to
    the commit ``revision`` points to (asked of the hub, or read from the local cache offline), which is returned:
    loading at that commit makes the receipt name exactly the files read. Errors name ``what`` and the fix."""
    if Path(path).exists():
        if not Path(path).is_dir():
            how = f"convert it first with `unlearn convert-gguf {path} OUT_DIR`" if path.endswith(".gguf") else (
                "give the checkpoint folder (config.json + model.safetensors)")  # fmt: skip
            raise ModelError(f"{what} {path!r} is a file: {how}")
        check_weight_files(path, what)
        provenance.record_model(path, revision, None)
        return revision
    known = provenance.model_revision(path, revision)
    if known is not None:
        return known  # resolved once per run: the student, the teacher and the tokenizer read the same commit
    from huggingface_hub.errors import (
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    try:
        sha = provenance.resolve_hub_revision(path, revision, "model")
    except HFValidationError:
        raise ModelError(
            f"{what} {path!r} is neither a local folder nor a hub id (owner/name): check the path"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(
            f"the hub repository {path!r} has no revision {revision!r}: fix model.revision"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{what} {path!r} is not a local folder, and the hub has no repository {path!r} (or it is private or "
            "gated: log in with `hf auth login`): check the path or the hub id"
        ) from None
    except RevisionResolutionError:
        why = "HF_HUB_OFFLINE forbids the hub" if provenance.hub_offline() else "the hub cannot be reached"
        raise ModelError(
            f"{what} {path!r} is not a local folder, {why} and the local hub cache holds no copy of it: on a "
            f"machine with the hub run `hf download {path} --local-dir DIR`, then set {what}=DIR"
        ) from None
    except Exception as exc:  # the hub raises many kinds (HTTP, network, auth): all mean "cannot read it"
        raise ModelError(f"cannot resolve the hub model {path!r} ({what}): {first_line(exc)}") from None
    provenance.record_model(path, revision, sha)
    return sha


def check_weight_files(folder: str | Path, what: str = "model.path") -> None:
    """Refuse, before any work, a local checkpoint whose safetensors files are damaged (truncated, overwritten)
    or whose shard index names a missing file: only their headers are read, which is cheap, and a damaged file
    found while loading would otherwise surface as a library traceback (or, in `train`, after the run folder
    is made)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelError(
                f"{what} {str(folder)!r}: {index.name} is not a readable shard index ({first_line(exc)}); "
                "save the checkpoint again with save_pretrained"
            ) from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelError(
                f"{what} {str(folder)!r}: {index.name} names weight files that are missing ({', '.join(missing[:3])}); "
                "copy the whole checkpoint folder again"
            )
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise ModelError(
                f"{what} {str(folder)!r}: the weight file {file.name} is damaged or truncated ({first_line(exc)}); "
                "copy or download the checkpoint again (or save it again with save_pretrained)"
            ) from None


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


def load_classifier(
    path: str,
    num_labels: int,
    revision: str | None = None,
    trust_remote_code: bool = False,
    what: str = "model.path",
):
    """Load an image classifier and check that it predicts ``num_labels`` classes (``what``: the config key
    that names ``path``, for the errors)."""
    if trust_remote_code and not revision:
        raise ModelError(
            "model.trust_remote_code=true runs the checkpoint's own Python code: pin it with model.revision=<commit>"
        )
    refuse_pickle_weights(path, "AutoModelForImageClassification")
    revision = resolve_model(path, revision, what)  # a hub id is loaded at the commit the receipt records
    auto = _auto()
    from safetensors import SafetensorError

    try:
        model = auto.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, SafetensorError) as exc:
        hint = "" if Path(path).exists() else " (it is not a local folder; hub ids need a network)"
        hint += safetensors_hint(exc)
        raise ModelError(f"cannot load a classifier from {path!r}{hint}: {first_line(exc)}") from exc
    except ValueError as exc:
        raise ModelError(f"{path!r} is not an image-classification checkpoint: {first_line(exc)}") from exc
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


def image_settings(
    path: str | None, mean: list[float], std: list[float], size: int | None, revision: str | None = None
) -> dict:
    """Normalisation of a checkpoint: from its image processor when it has one, else the given."""
    if path is not None:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(path, revision=revision)
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
