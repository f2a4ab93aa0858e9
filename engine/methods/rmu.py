"""RMU (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning":
Representation Misdirection for Unlearning). The hidden states output by decoder layer l are steered, on the forget
answers, to a fixed random direction c*u, and held, on the retain answers, to the frozen original's at layer l:

    loss = gamma * mean_forget_seq[ mean_t ||h_l(x_t) - c*u||^2 / H ]
         + alpha * mean_retain_seq[ mean_t ||h_l(x_t) - h_l^frozen(x_t)||^2 / H ]

over each sequence's answer tokens t (their own positions: open-unlearning's mask ``labels != -100``), H the
hidden size. Faithful to open-unlearning's ``src/trainer/unlearn/rmu.py`` (locuslab/open-unlearning, itself from
centerforaisafety/wmdp ``rmu/unlearn.py``): ``compute_activation_loss`` (the squared error's mean over H, summed over
a sequence's masked tokens, divided by their count, then the mean over the batch's sequences), its control vector
(``torch.rand(1, 1, H)`` normalised to a unit vector, times ``steering_coeff``; here drawn from the run's seed so
every rank and a resumed run steer to the same u), and its settings (``configs/trainer/RMU.yaml`` and
``configs/experiment/unlearn/wmdp/default.yaml``: steering_coeff 2, alpha 1, gamma 1, ``module_regex
model\\.layers\\.7``, ``trainable_params_regex model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight`` as in WMDP).

The activations reach the loss through ``Method.outputs``: the task's forward runs as usual with a forward hook on
the decoder layer, found by name in ``named_modules()`` (a plain Hugging Face model, a peft LoRA student and its
adapters-disabled teacher, a DeepSpeed engine; under ZeRO-3 a hook on a module sees the full activations). The
other weights are frozen in ``check_model``, before the optimizer is built (engine/methods/base.py).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from engine.data.text import IGNORE
from engine.errors import ConfigError
from engine.methods.base import LossTerms, Method, Phase
from engine.methods.grad_diff import GradDiffConfig
from engine.methods.losses import activation_mse_sum
from engine.models.lora import AdapterDisabled

# the attribute names of the decoder-layer list in Hugging Face causal LMs: Llama, Mistral, Qwen, Gemma, Phi-3
# (model.layers), GPT-2, Falcon, Bloom (transformer.h), others (blocks)
_STACKS = ("layers", "h", "blocks", "block")


class RmuConfig(GradDiffConfig):
    """Defaults: open-unlearning's RMU (steering_coeff 2, alpha 1, gamma 1, layer 7, layers 5-7's
    mlp.down_proj training), WMDP's learning rate 5e-5, open-unlearning's TOFU schedule (AdamW, weight decay 0.01,
    10 epochs, batch 32)."""

    name: Literal["rmu"] = Field("rmu", description="Method name.")
    lr: float = Field(5e-5, gt=0, description="Learning rate (WMDP's RMU: 5e-5).")
    gamma: float = Field(1.0, ge=0, description="Weight of the forget term (steering to c*u).")
    alpha: float = Field(
        1.0, ge=0, description="Weight of the retain term (the frozen original's activations kept)."
    )
    steering_coeff: float = Field(
        2.0, gt=0, description="c: the norm of the control vector c*u the forget activations are steered to."
    )
    layer: int = Field(
        7,
        ge=0,
        description="l: the decoder layer (0-based) whose output hidden states are steered and held "
        "(open-unlearning's module_regex model.layers.7).",
    )
    trainable_params: list[str] | None = Field(
        None,
        description="Regexes, each matched against the whole name of a parameter of the loaded model (e.g. "
        "model.layers.5.mlp.down_proj.weight); only matching parameters train. None: mlp.down_proj.weight of "
        "layers l-2..l (WMDP's); ['.*']: every parameter (open-unlearning's RMU.yaml). Not with model.lora "
        "(the adapters are what trains).",
    )

    def check_run(self, run) -> None:
        if run.task != "causal_lm":
            raise ValueError(
                "method=rmu steers a causal LM's decoder-layer activations: it needs task=causal_lm"
            )
        if run.model.lora is not None and self.trainable_params is not None:
            raise ValueError(
                "method.trainable_params does not apply to a LoRA student (its adapters are what trains): "
                "unset method.trainable_params or model.lora"
            )


def control_vector(seed: int, hidden_size: int) -> torch.Tensor:
    """u: a unit vector of ``hidden_size`` float32 entries, fixed by ``seed``; WMDP's and open-unlearning's draw
    (uniform [0, 1) entries, normalised), so u lies in the positive orthant as theirs."""
    u = torch.rand(hidden_size, generator=torch.Generator().manual_seed(seed))
    return u / torch.linalg.vector_norm(u)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The name and the list of ``model``'s decoder layers: its one ModuleList named layers, h or blocks, looked
    for in ``named_modules()`` (through a LoRA teacher, which holds its student outside its modules)."""
    root = model.student if isinstance(model, AdapterDisabled) else model
    found = [
        (name, m)
        for name, m in root.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in _STACKS
    ]
    if len(found) != 1:
        what = f"several ({', '.join(n for n, _ in found)})" if found else "none"
        raise ConfigError(
            f"method=rmu needs one list of decoder layers (a ModuleList named {'/'.join(_STACKS)}) in "
            f"{type(root).__name__}, found {what}: use another method for this model"
        )
    return found[0]


class Rmu(Method):
    needs_teacher = True  # the frozen original's layer-l activations on the retain answers
    needs = ("teacher", "paired")
    parts = ("forget", "retain")  # each a mean over its own sequences (open-unlearning's per-batch means)

    def __init__(self, config: RmuConfig):
        self.config = config
        # the run's seed: the session seeds torch with it before the method is built (engine/recipes/session.py)
        self.seed = torch.initial_seed()
        self._u: torch.Tensor | None = None
        self.trainable: list[str] = []  # the parameters left to train (check_model)
        self._layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        f = batch["is_forget"]
        return int(f.sum()), int((~f).sum())

    def teacher_cache_off(self) -> str | None:
        return "RMU's teacher outputs are layer activations, not the logits the cache keeps"

    # --- the activations
    def layer_of(self, model: torch.nn.Module) -> torch.nn.Module:
        """Decoder layer ``config.layer`` of ``model`` (found once per model)."""
        if model not in self._layers:
            self._layers[model] = decoder_layers(model)[1][self.config.layer]
        return self._layers[model]

    def outputs(self, forward: Callable) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
        def hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
            captured: list[torch.Tensor] = []

            def hook(module, args, output):
                # a decoder layer returns its hidden states, or a tuple led by them (older transformers)
                captured.append(output[0] if isinstance(output, tuple) else output)

            # removed right after the forward: a checkpointed layer's recomputation in backward is not captured
            handle = self.layer_of(model).register_forward_hook(hook)
            try:
                forward(model, batch)  # the logits are not used
            finally:
                handle.remove()
            return captured[0]  # [B, S, H]

        return hidden_states

    def control(self, hidden_size: int) -> torch.Tensor:
        """c*u ([H], float32), drawn once."""
        if self._u is None or self._u.numel() != hidden_size:
            self._u = control_vector(self.seed, hidden_size)
        return self.config.steering_coeff * self._u

    # --- the model
    def check_model(self, student: torch.nn.Module) -> None:
        name, layers = decoder_layers(student)
        c = self.config
        if c.layer >= len(layers):
            raise ConfigError(
                f"method.layer={c.layer} is beyond the model's {len(layers)} decoder layers ({name}.0-"
                f"{len(layers) - 1}): set method.layer to at most {len(layers) - 1}"
            )
        patterns = c.trainable_params
        if patterns is None:  # WMDP's: layers l-2..l's MLP down-projection
            ids = "|".join(str(i) for i in range(max(0, c.layer - 2), c.layer + 1))
            patterns = [rf"{re.escape(name)}\.({ids})\.mlp\.down_proj\.weight"]
        self.trainable = [
            n for n, _ in student.named_parameters() if any(re.fullmatch(p, n) for p in patterns)
        ]
        if not self.trainable:
            raise ConfigError(
                f"no parameter of {type(student).__name__} matches {patterns}: set method.trainable_params to "
                f"regexes of its parameter names (e.g. {name}\\.{c.layer}\\.mlp\\..*)"
            )
        # before the optimizer is built (Method.check_model): what is frozen here never reaches it
        chosen = set(self.trainable)
        for n, p in student.named_parameters():
            p.requires_grad_(n in chosen)

    # --- the loss
    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        if batch is None or "is_forget" not in batch:
            raise ValueError("RMU needs batches from a PairedStream (forget rows paired with retain rows)")
        c = self.config
        states = student_logits  # [B, S, H]: the layer's hidden states (``outputs``)
        is_f = batch["is_forget"].to(states.device)
        # the answer tokens' own positions, as open-unlearning's mask (labels != -100)
        mask = batch["token_labels"].to(states.device) != IGNORE
        target = self.control(states.shape[-1]).to(states.device)
        forget = c.gamma * activation_mse_sum(states[is_f], target, mask[is_f])
        retain = c.alpha * activation_mse_sum(states[~is_f], teacher_logits[~is_f].detach(), mask[~is_f])
        return LossTerms(total=forget + retain, count=int(is_f.shape[0]), parts=(forget, retain))
