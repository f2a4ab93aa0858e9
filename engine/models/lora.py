"""LoRA students through peft (``model.lora``): only the adapters train, and the teacher is the same base
weights with the adapters disabled (TRL's ``disable_adapter()`` reference), so one copy of the model is in
memory and the teacher cannot drift: its weights are never in the optimizer.

A model with BatchNorm layers (the CIFAR networks) gets each of them as a peft ``modules_to_save`` copy: in
train mode a BatchNorm updates its running statistics, which are not parameters and so not protected by
freezing; the student updates its copy's, the teacher (adapters disabled) reads the untouched originals.
The copies' affine parameters stay frozen: only ``lora_`` parameters train.

Export (engine/artifacts/export.py): ``merged_state_dict`` folds each adapter into its base weight (a plain
checkpoint any Hugging Face loader reads), without touching the live model; or the adapter alone
(``adapter_model.safetensors`` + ``adapter_config.json``, loaded over the base with ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from engine.errors import ConfigError, ModelError, first_line
from engine.settings import StrictModel


class LoraSettings(StrictModel):
    """A LoRA student (peft): only the adapters train; the teacher is the same base weights with the adapters
    disabled, so one copy of the model is in memory."""

    rank: int = Field(16, ge=1, description="r: the rank of each adapter.")
    alpha: float = Field(
        32.0, gt=0, description="lora_alpha: the adapter's output is scaled by alpha / rank."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="lora_dropout: dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: names or name suffixes (q_proj, v_proj; conv1, fc for an image "
        "classifier), or all-linear (every linear layer but the output head; causal LMs).",
    )
    merge: bool = Field(
        True,
        description="Export the merged model (base + adapters, a plain checkpoint); false: the adapter alone "
        "(adapter_model.safetensors + adapter_config.json, loaded over the base with peft).",
    )


ADAPTED_KINDS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
EXPORTS = ("merged", "adapter")
PEFT_PREFIX = "base_model.model."  # what a PeftModel (LoRA) puts before the base model's own names


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model. Never imports peft: a model made by peft exists only once it is loaded,
    so a run without LoRA does not pay peft's import."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_adapter_parameter(name: str) -> bool:
    """A parameter the adapter adds (``lora_A``/``lora_B``, the BatchNorm copies): not a base weight."""
    return "lora_" in name or ".modules_to_save." in name


def _module_names(model: torch.nn.Module, limit: int = 8) -> str:
    """A few names that ``target_modules`` accepts for ``model``, for an error message: the last part of each
    adaptable module's name when it is a word (q_proj, conv1), else the whole name (features.0.0)."""
    names = _adaptable_names(model)
    count = sum(1 for n, m in model.named_modules() if n and isinstance(m, ADAPTED_KINDS))
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"{shown} ({count} Linear/Conv/Embedding modules in all)"


def _adaptable_names(model: torch.nn.Module) -> list[str]:
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, ADAPTED_KINDS) and name:
            last = name.rsplit(".", 1)[-1]
            short = name if last.isdigit() else last
            if short not in names:
                names.append(short)
    return names


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Refuse, in one line, a target name that matches no module or a module LoRA cannot adapt. peft's own
    messages for these speak of its internals (exclude_modules, modules_to_save), not of the config."""
    kind = type(model).__name__
    tied = _tied_weights(model)
    for target in targets:
        # peft's rule for a list: the module of that name, or any whose name ends in .NAME
        named = [(n, m) for n, m in model.named_modules() if n == target or n.endswith("." + target)]
        matched = [m for _, m in named]
        if not matched:
            raise ConfigError(
                f"model.lora.target_modules: no module of {kind} is named {target!r} (a name matches the module "
                f"of that name and every module whose name ends in .NAME); its modules: {_module_names(model)}"
            )
        wrong = sorted({type(m).__name__ for m in matched if not isinstance(m, ADAPTED_KINDS)})
        shared = [n for n, m in named if id(getattr(m, "weight", None)) in tied]
        if wrong:
            raise ConfigError(
                f"model.lora.target_modules: {target!r} names {'/'.join(wrong)} modules, which LoRA cannot adapt "
                f"(Linear, Conv and Embedding layers only); {kind}'s modules: {_module_names(model)}"
            )
        if (
            shared
        ):  # the merged export holds one tensor for both: it could not be the base for one and not the other
            raise ConfigError(
                f"model.lora.target_modules: {target!r} adapts {shared[0]}, whose weight is tied to another "
                "module's (the input embeddings): leave it out of target_modules"
            )


def _is_language_model(model: torch.nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """``model`` with LoRA adapters (``settings``: engine.config.LoraSettings) on its target modules; the base
    weights frozen, the adapters trainable. A causal LM becomes a ``PeftModelForCausalLM`` (``generate`` and the
    adapter's task type for loaders); any other module (an image classifier) a ``PeftModel``, through peft's
    custom-model support, its BatchNorm layers copied (module docstring). Refused (ConfigError, one line) when
    no module matches, a matched module is of a kind LoRA cannot adapt, ``all-linear`` is asked of a model that
    is not a language model, or an adapted weight is tied to another (the merged export could not hold both)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = settings.target_modules
    language = _is_language_model(model)
    kind = type(model).__name__
    if targets == "all-linear" and not language:
        # peft's all-linear keeps only Linear layers and drops the output head of a language model; in an image
        # classifier that leaves the classifier head alone, while the features sit in the convolutions
        example = ",".join(_adaptable_names(model)[:2])
        raise ConfigError(
            f"model.lora.target_modules=all-linear is for language models; list the modules of {kind} to adapt, "
            f"e.g. model.lora.target_modules=[{example}] (its modules: {_module_names(model)})"
        )
    if isinstance(targets, list):
        _check_targets(model, targets)
    batchnorms = [
        name for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]  # fmt: skip
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        modules_to_save=batchnorms or None,
        task_type=TaskType.CAUSAL_LM if language else None,
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # what _check_targets does not foresee (a peft limit on some layer)
        raise ConfigError(f"model.lora.target_modules={_show(targets)}: {first_line(exc)}") from None
    for name, p in peft_model.named_parameters():
        # peft makes the BatchNorm copies trainable; they are there for their running statistics only
        p.requires_grad_("lora_" in name)
    return peft_model


def _show(targets: list[str] | str) -> str:
    return targets if isinstance(targets, str) else "[" + ",".join(targets) + "]"


def _tied_weights(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied input and output embeddings)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, layer) of every LoRA layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the whole size aside from its partition


def lora_summary(model: torch.nn.Module, settings: LoraSettings | None = None) -> dict:
    """What the receipt, the record and the model card say of a LoRA student: its settings, the modules it
    adapts, how many parameters train (of how many) and what is exported (``merged`` or ``adapter``).
    Without ``settings`` (an export of a peft model whose run gave none) they are read from the model and the
    export is the default, merged."""
    config = model.peft_config[model.active_adapter]
    targets = settings.target_modules if settings is not None else config.target_modules
    if settings is None and not isinstance(targets, str):
        # peft resolves all-linear into every full module name (hundreds in a large model): the kinds say it
        targets = {t.rsplit(".", 1)[-1] if not t.rsplit(".", 1)[-1].isdigit() else t for t in targets}
    params = dict(model.named_parameters())
    base = sum(_numel(p) for n, p in params.items() if not is_adapter_parameter(n))
    adapter = sum(_numel(p) for n, p in params.items() if "lora_" in n)
    merge = settings.merge if settings is not None else True
    return {
        "rank": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "adapted_modules": sum(1 for _ in lora_layers(model)),
        "trainable_parameters": adapter,
        "total_parameters": base + adapter,
        "export": "merged" if merge else "adapter",
        "base_model": config.base_model_name_or_path,
    }


def loader_class(model: torch.nn.Module) -> str:
    """The transformers Auto class that loads the base of a peft model (what an adapter is loaded over)."""
    if getattr(model.peft_config[model.active_adapter], "task_type", None) == "CAUSAL_LM":
        return "AutoModelForCausalLM"
    base = model.get_base_model()
    return "AutoModelForImageClassification" if base.main_input_name == "pixel_values" else "AutoModel"


def merged_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """The weights of the plain model a peft model stands for: each adapter folded into its base weight
    (``W + scaling * B @ A``, as peft's ``merge_and_unload``), each BatchNorm copy in place of its original,
    under the base model's own names. Computed from ``state_dict`` (ZeRO-3's gathered weights; default the
    model's own) without changing the model: unlike ``merge_and_unload`` this leaves the live student and its
    teacher (the same base weights) as they were, and costs one extra copy of the adapted weights only.
    The sum is formed in float32 and cast back, so a bfloat16 model loses no adapter update to rounding."""
    state = dict(model.state_dict() if state_dict is None else state_dict)
    adapter = model.active_adapter
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        own = {k[len(name) + 1 :]: state.pop(k) for k in [k for k in state if k.startswith(name + ".")]}
        # peft's own delta (conv, fan_in_fan_out, scaling) computed on the given tensors, not the module's:
        # under ZeRO-3 the module holds only its partition
        delta = torch.func.functional_call(
            _Delta(layer, adapter),
            {f"layer.{k}": v.float() if "lora_" in k else v for k, v in own.items()},
            (),
        )
        for k, v in own.items():
            if not k.startswith("base_layer."):
                continue  # lora_A, lora_B: folded into the weight
            if k == "base_layer.weight":
                v = (v.float() + delta.to(v.device)).to(v.dtype)
            out[f"{name}.{k.removeprefix('base_layer.')}"] = v
    from peft.utils import ModulesToSaveWrapper

    copies = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name in copies:
        keep = f"{name}.modules_to_save.{adapter}."
        for k in [k for k in state if k.startswith(name + ".")]:
            v = state.pop(k)
            if k.startswith(keep):
                out[name + "." + k[len(keep) :]] = v
    out.update(state)
    leftover = [k for k in out if is_adapter_parameter(k) or ".base_layer." in k or ".original_module." in k]
    if leftover:  # a peft layer kind this function does not know: better no export than a wrong one
        raise ModelError(
            f"cannot merge the LoRA adapter: unexpected weights {leftover[:3]}; set model.lora.merge=false"
        )
    return {k.removeprefix(PEFT_PREFIX): v for k, v in out.items()}


class _Delta(torch.nn.Module):
    """``layer.get_delta_weight(adapter)`` as a forward, so ``functional_call`` can run it on other tensors."""

    def __init__(self, layer: torch.nn.Module, adapter: str):
        super().__init__()
        self.layer = layer
        self.adapter = adapter

    def forward(self) -> torch.Tensor:
        return self.layer.get_delta_weight(self.adapter)


class AdapterDisabled(torch.nn.Module):
    """The teacher of a LoRA student: calls the student's base model with its adapters disabled and in eval
    mode (no dropout; BatchNorm's original running statistics), under no_grad by the loop. It holds no module
    of its own (the student is kept out of ``_modules``), so moving, freezing or saving it never touches the
    student; ``parameters()`` are the base weights (the teacher's fingerprint)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a submodule: see the class docstring

    def forward(self, *args, **kwargs):
        # each module's own mode, restored as it was: a method may hold some layers in eval mode while the
        # student trains, and a blanket train(True) afterwards would undo that
        modes = [(m, m.training) for m in self.student.modules()]
        self.student.eval()
        try:
            with self.student.disable_adapter():
                return self.student(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return (p for _, p in self.named_parameters())

    def named_parameters(self, *args, **kwargs) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.student.named_parameters() if not is_adapter_parameter(n))


def save_lora(
    model: torch.nn.Module, folder: str | Path, export: str, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write a LoRA student into ``folder``: ``export="merged"``: the plain model (``config.json`` +
    ``model.safetensors``, adapters folded in: ``merged_state_dict``), read back by the plain loaders;
    ``"adapter"``: the adapter alone (``adapter_model.safetensors`` + ``adapter_config.json`` naming the base model
    in ``base_model_name_or_path``). ``state_dict``: the weights to write when the module's own are sharded
    (ZeRO-3's gathered ones). The live model is left as it was in both cases."""
    if export not in EXPORTS:
        raise ValueError(f"LoRA export {export!r}: expected one of {EXPORTS}")
    if export == "merged":
        # the base model's save_pretrained writes its own config and class, so the folder is what the input
        # model's folder was, with other weights; the adapter layers inside it are not saved, only `merged`
        model.get_base_model().save_pretrained(
            folder, safe_serialization=True, state_dict=merged_state_dict(model, state_dict)
        )
    else:
        # save_embedding_layers=False: the engine never resizes the vocabulary, so the base embeddings need not
        # travel with the adapter ("auto" would also ask the hub whether they changed)
        model.save_pretrained(
            folder, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False
        )
