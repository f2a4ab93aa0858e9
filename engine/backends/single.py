"""One process, one device: the embedded default. A backend places the models, owns the optimizer,
orders and shards the data, and performs backward/step; it never knows which method runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from engine.data.sampling import epoch_order, order_seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SingleProcessBackend:
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str = "auto", num_threads: int | None = None):
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.optimizer: torch.optim.Optimizer | None = None

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
            teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.optimizer = build_optimizer([p for p in student.parameters() if p.requires_grad])
        return student, teacher

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def batches(self, stream, batch_size: int, seed: int, epoch: int, name: str) -> Iterator[dict]:
        """The stream's rows in this epoch's order, cut into batches (the partial last one is kept)."""
        order = epoch_order(len(stream), seed, epoch, name)
        for k, rows in enumerate(order.split(batch_size)):
            batch = stream.get(rows, seed=order_seed(seed, epoch, name) * 7_919 + k)  # augmentation draw
            yield {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in batch.items()}

    def num_batches(self, stream, batch_size: int) -> int:
        return -(-len(stream) // batch_size)

    def global_count(self, count: int) -> int:
        return count

    def all_finite(self, loss: torch.Tensor) -> bool:
        return bool(torch.isfinite(loss).all())

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
