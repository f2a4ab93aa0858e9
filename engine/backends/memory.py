"""Per-rank memory: the peak (accelerator memory where there is one, host RSS otherwise) and the bytes
of parameters, gradients and optimizer state this rank holds, measured (not computed from the ZeRO
stage) at the moment they all exist: right after the inner torch optimizer's step, before the
gradients are released. Tensors are counted once per storage, so flat ZeRO buffers and views into them
are not double-counted."""

from __future__ import annotations

import resource
import sys

import torch


def peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "accelerator (torch.cuda.max_memory_allocated)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "host peak RSS"


def _storages(tensors) -> dict[tuple[str, int], int]:
    out = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        out[(str(t.device), s.data_ptr())] = s.nbytes()
    return out


def inner_optimizer(optimizer):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO keeps it as ``.optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class StateMeter:
    """Largest parameter / gradient / optimizer-state bytes seen at any optimizer step of this rank."""

    def __init__(self, model: torch.nn.Module, optimizer, partitioned: bool):
        self.model, self.partitioned = model, partitioned
        self.inner = inner_optimizer(optimizer)
        self.max = {"parameter_bytes": 0, "gradient_bytes": 0, "optimizer_bytes": 0}
        if isinstance(self.inner, torch.optim.Optimizer):
            self.inner.register_step_post_hook(lambda *_: self.measure())

    def _params(self) -> list[torch.Tensor]:
        # ZeRO-3 keeps this rank's partition in ds_tensor; the parameter itself is an empty placeholder
        return [getattr(p, "ds_tensor", p) if self.partitioned else p for p in self.model.parameters()]

    def measure(self) -> None:
        params = _storages(self._params())
        inner_params = [p for g in self.inner.param_groups for p in g["params"]]
        grads = _storages([p.grad for p in self.model.parameters()] + [p.grad for p in inner_params])
        state = [v for s in self.inner.state.values() for v in s.values() if torch.is_tensor(v)]
        masters = {k: v for k, v in _storages(inner_params).items() if k not in params}  # fp32 partitions
        opt = {**_storages(state), **masters}
        now = {
            "parameter_bytes": sum(params.values()),
            "gradient_bytes": sum(v for k, v in grads.items() if k not in params),
            "optimizer_bytes": sum(opt.values()),
        }
        for k, v in now.items():
            self.max[k] = max(self.max[k], v)

    def report(self, rank: int, device: torch.device) -> dict:
        peak, kind = peak_bytes(device)
        state = sum(self.max.values())
        return {"rank": rank, **self.max, "state_bytes": state, "peak_bytes": peak, "peak_kind": kind}
