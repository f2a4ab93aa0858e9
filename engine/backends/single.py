"""One process, one device: the embedded default. A backend places the models, owns the optimizer,
orders and shards the data (base.py), and performs backward/step; it never knows which method runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.backends.base import Backend
from engine.backends.memory import StateMeter
from engine.errors import ConfigError

SCALER = "optimizer_grad_scaler.json"  # fp16 on CUDA: the loss scale and its growth tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class SingleProcessBackend(Backend):
    name = "single"
    zero_stage = None

    def __init__(
        self,
        device: str = "auto",
        num_threads: int | None = None,
        accum: int = 1,
        keep_checkpoints: bool = False,
        dtype: str = "fp32",
    ):
        self.device = resolve_device(device)
        self.keep_checkpoints = keep_checkpoints
        if num_threads:
            torch.set_num_threads(num_threads)
        self.accum = accum
        if dtype not in AUTOCAST_DTYPES:
            raise ConfigError(f"backend.dtype={dtype} is not one of {', '.join(AUTOCAST_DTYPES)}")
        if dtype == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "backend.dtype=bf16 needs a GPU with bfloat16 (Ampere or newer): set backend.dtype=fp16 or fp32"
            )
        self.dtype = dtype
        # fp16's narrow exponent underflows small gradients to 0: scale the loss up in backward and the
        # gradients back down before the step (bf16 has fp32's range and needs none; CPU autocast keeps
        # gradients in fp32 parameters, so only CUDA gets a scaler, as torch's AMP recipe does)
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" and self.device.type == "cuda" else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.meter: StateMeter | None = None

    def autocast(self) -> AbstractContextManager:
        """Forwards in ``backend.dtype`` where it is safe (matmuls, convolutions; torch keeps reductions and
        softmaxes in fp32); the weights and the optimizer stay fp32. fp32: no autocast."""
        if AUTOCAST_DTYPES[self.dtype] is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[self.dtype])

    def init_context(self):
        """Models built inside are placed as this backend wants them (nothing special in one process)."""
        return nullcontext()

    def prepare(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        build_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """Move the models to the device, freeze the teacher (eval mode, no grads, no optimizer) and
        build the ONE optimizer over the student's parameters."""
        student = student.to(self.device)
        if teacher is not None:
            teacher = self.prepare_frozen(teacher)
        self.optimizer = build_optimizer([p for p in student.parameters() if p.requires_grad])
        self.meter = StateMeter(student, self.optimizer, partitioned=False)
        return student, teacher

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device).eval().requires_grad_(False)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # gradients of the micro-batches of one step add up (scaled alike under fp16, so they still do)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            # unscales the gradients, skips the step when any is inf/nan (the scale was too large) and
            # lowers the scale; a finite loss can still overflow in fp16, so this is not a divergence
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer(self) -> None:
        """Clear the optimizer's per-parameter state (Adam's moments and step count): torch's optimizers
        build it afresh at the next step, as for a new optimizer; learning rates are kept."""
        self.optimizer.state.clear()

    # --- whole-model views and checkpoints ---------------------------------------------------------

    def unwrap(self, model):
        return model

    def full_state_dict(self, model) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on the main process (None elsewhere); None here = the model's own."""
        return None

    def save_checkpoint(self, folder: Path, tag: str, student, client_state: dict) -> None:
        """Weights (safetensors), optimizer state and the recipe's ``client_state`` (JSON) into
        ``folder/tag`` (engine/checkpoint/store.py adds the RNG states and, last, the manifest)."""
        out = folder / tag
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()},
                  out / "model.safetensors")  # fmt: skip
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt")
        if self.scaler is not None:  # "optim" in the name: the store counts it as optimizer state
            (out / SCALER).write_text(json.dumps(self.scaler.state_dict()))
        (out / "client_state.json").write_text(json.dumps(client_state, default=float))

    def load_checkpoint(self, folder: Path, tag: str, student, weights_only: bool = False) -> dict:
        """Load checkpoint ``folder/tag`` (verified by the store first): the weights, and unless
        ``weights_only`` the optimizer state. Returns the recipe's client_state."""
        student.load_state_dict(load_file(folder / tag / "model.safetensors"))
        if not weights_only:
            # weights_only: an optimizer state is tensors and numbers; no arbitrary pickle is run
            state = torch.load(folder / tag / "optimizer.pt", weights_only=True)  # noqa: TID251
            self.optimizer.load_state_dict(state)
            if self.scaler is not None and (folder / tag / SCALER).is_file():  # absent: written without fp16
                self.scaler.load_state_dict(json.loads((folder / tag / SCALER).read_text()))
        return json.loads((folder / tag / "client_state.json").read_text())

    def memory_report(self) -> list[dict]:
        return [self.meter.report(self.rank, self.device)]

    def broadcast_object(self, obj):
        return obj

    def close(self) -> None:
        pass

    def gather_object(self, obj):
        return [obj]

    def barrier(self) -> None:
        pass
