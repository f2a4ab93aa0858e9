"""The forgetting receipt: what an auditor needs to tie a deletion request to a model file.

``receipt.json`` is written into every completed `unlearn run` folder. It holds the sha256 of the sorted forget ids
(as the model card has it), the sha256 of every weight file of the input model (when it is a local folder) and of
each exported model, where every model and dataset the run read came from (``sources``: a local path, a hub id with
the commit it was read at, or a hub id read from an ``UNLEARN_DATA_MIRROR`` copy), the sha256 of the resolved config,
the method, the versions of the engine and its main dependencies, the final metrics and the start/end timestamps
(UTC). ``unlearn verify RECEIPT MODEL_DIR`` recomputes
the weight files' hashes of a model folder and says which exported model of the receipt it is, or that it is none.

Hashes are of the files as written (safetensors bytes), not of tensors in memory: what is checked is exactly what was
shipped, and the check needs neither torch nor the model's code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from importlib import metadata
from pathlib import Path

from engine.errors import EngineError

WEIGHT_SUFFIXES = (".safetensors",)
DEPENDENCIES = ("torch", "transformers", "datasets", "deepspeed", "ray", "accelerate", "safetensors")


class VerifyError(EngineError):
    """The model folder is not one the receipt names (exit code 1: a verdict, not a usage error)."""

    exit_code = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_hashes(folder: str | Path) -> dict[str, str] | None:
    """sha256 of each weight file in ``folder`` by file name; None when ``folder`` is not a local folder (a hub id)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {p.name: sha256_file(p) for p in files}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    from engine import __version__

    return {"engine": __version__, **{name: _version(name) for name in DEPENDENCIES}}


def write_receipt(
    stage: Path,
    *,
    forget: dict,
    input_model: str,
    revision: str | None,
    outputs: dict[str, str],
    method: dict,
    metrics: dict,
    started_at: str,
    sources: dict[str, list[dict]] | None = None,
    lora: dict | None = None,
) -> dict:
    """Write ``stage/receipt.json`` (atomically) once the models and ``config.yaml`` are in ``stage``.
    ``outputs``: name -> folder inside ``stage`` (``model``, ``model_rewound``). ``sources``: what the run read
    (engine/provenance.py ``loaded()``); the input model's ``revision`` is the commit it was read at
    when it came from the hub, else ``revision`` as configured. ``lora``: a LoRA student's summary
    (engine/models/lora.py ``lora_summary``: its settings and ``export``, ``merged`` or ``adapter``); with an adapter
    export the output's weight files are the adapter's, and the model is that adapter over the input model."""
    from engine.io import json_safe, write_text_atomic

    sources = sources or {"models": [], "datasets": []}
    read = next((e for e in sources["models"] if e["source"] == input_model), None)
    receipt = {
        "receipt_version": 2,  # 2: `sources`, and input_model.revision is the commit read (hub) or null (local)
        "forget": {k: forget.get(k) for k in ("kind", "description", "size", "ids_sha256")},
        "input_model": {
            "source": input_model,
            "local": Path(input_model).is_dir(),
            "revision": read["revision"] if read else revision,
            "weights_sha256": weight_hashes(input_model),
        },
        "sources": sources,
        "output_models": {
            name: {"folder": folder, "weights_sha256": weight_hashes(stage / folder)}
            for name, folder in outputs.items()
        },  # fmt: skip
        "config_sha256": sha256_file(stage / "config.yaml"),
        "method": method,
        "versions": {**_versions(), **({"peft": _version("peft")} if lora is not None else {})},
        "metrics": metrics,
        **({"lora": lora} if lora is not None else {}),  # absent without LoRA: older receipts read the same
        "started_at": started_at,
        "finished_at": now(),
    }
    write_text_atomic(stage / "receipt.json", json.dumps(json_safe(receipt), indent=2))
    return receipt


def verify(receipt_path: str | Path, model_dir: str | Path) -> str:
    """The name of the receipt's exported model that ``model_dir`` is (its weight files hash the same);
    VerifyError naming the differing files otherwise."""
    receipt_path, model_dir = Path(receipt_path), Path(model_dir)
    if receipt_path.is_dir():
        receipt_path = receipt_path / "receipt.json"
    try:
        receipt = json.loads(receipt_path.read_text())
        outputs = receipt["output_models"]
    except (OSError, ValueError, KeyError) as exc:
        raise EngineError(f"{receipt_path} is not a readable receipt.json ({exc})") from None
    found = weight_hashes(model_dir)
    if not found:
        raise VerifyError(f"{model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    for name, out in outputs.items():
        if out.get("weights_sha256") == found:
            return name
    lines = [f"{model_dir} is not a model this receipt names ({receipt_path}):"]
    for name, out in outputs.items():
        expected = out.get("weights_sha256") or {}
        diff = sorted(f for f in set(expected) | set(found) if expected.get(f) != found.get(f))
        lines.append(f"  - {name}: differs in {', '.join(diff)}")
    raise VerifyError("\n".join(lines))
