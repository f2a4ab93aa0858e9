"""The frozen teacher's outputs, computed once (``method.teacher_cache=auto``).

SCRUB's teacher is frozen and, without augmentation, sees the same rows every epoch, so its outputs per row
never change: they are computed in one pass before the first step and looked up by row afterwards. The pass
runs the STUDENT in eval mode, which before its first step is the teacher (both are the checkpoint), so no
second model is loaded; a resumed run computes them from the teacher, loaded for that pass only.

What is kept per row (an example of a classifier, the answer tokens of a causal LM):
- the full distribution (exact) while a stream's fits ``budget_bytes`` per process: the probabilities at the
  divergence's temperature and their sum p log p (``engine.methods.losses.TeacherProbs``), so a step computes
  the divergence as one soft-target cross-entropy;
- beyond it, per token the top ``topk`` logits, their vocabulary ids and the logsumexp over the whole
  vocabulary at the divergence's temperature (``engine.methods.losses.TopKLogits``): the divergence over the
  top k plus one tail bucket, whose mass is measured and reported.

With several processes each computes its share of the rows (the same number of forwards on every rank, as
ZeRO-3's collective forwards need) and the shares are gathered, so every rank can serve any row of any epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine.methods.losses import TeacherProbs, TopKLogits


@dataclass
class StreamOutputs:
    """One stream's cached outputs: row ``r``'s are rows ``offsets[r]:offsets[r + 1]`` of ``values`` (and of
    ``indices`` / ``lse`` when top-k)."""

    offsets: torch.Tensor  # [N + 1] int64
    values: torch.Tensor  # [T, C] full probabilities at the temperature, or [T, k] top-k logits
    indices: torch.Tensor | None = None  # [T, k] int32 vocabulary ids (top-k only)
    lse: torch.Tensor | None = None  # [T] logsumexp(logits / temperature) (top-k only)
    neg_entropy: torch.Tensor | None = None  # [T] sum p log p (full only)

    @property
    def nbytes(self) -> int:
        tensors = (self.offsets, self.values, self.indices, self.lse, self.neg_entropy)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """The positions in ``values`` of ``rows``' outputs, rows in the given order (a batch's order)."""
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        first = torch.cumsum(lengths, 0) - lengths  # where each row's block starts in the result
        return torch.repeat_interleave(starts - first, lengths) + torch.arange(int(lengths.sum()))


class TeacherCache:
    """Stream name -> cached outputs; ``lookup(name, batch)`` is what a teacher forward on ``batch`` returns."""

    def __init__(self, streams: dict[str, StreamOutputs], temperature: float, seconds: float, topk: int):
        self.streams, self.temperature, self.seconds, self.topk = streams, temperature, seconds, topk

    def __contains__(self, name: str) -> bool:
        return name in self.streams

    def lookup(self, name: str, batch: dict) -> torch.Tensor | TopKLogits:
        s = self.streams[name]
        rows = batch["rows"].cpu().long()
        at = s.select(rows)
        device = batch["labels"].device
        if s.indices is None:
            return TeacherProbs(s.values[at], s.neg_entropy[at], self.temperature).to(device)
        return TopKLogits(s.values[at], s.indices[at], s.lse[at], self.temperature).to(device)

    def summary(self) -> dict:
        """report.json's ``teacher_cache``: per stream what is kept, its size and (top-k) the tail mass."""
        out = {"seconds": self.seconds, "temperature": self.temperature, "streams": {}}
        for name, s in self.streams.items():
            row = {"rows": len(s.offsets) - 1, "outputs": int(s.values.shape[0]), "bytes": s.nbytes,
                   "kind": "probs" if s.indices is None else "topk"}  # fmt: skip
            if s.indices is not None:
                tail = TopKLogits(s.values, s.indices, s.lse, self.temperature).tail_mass()
                row.update(topk=self.topk, tail_mass_mean=float(tail.mean()) if len(tail) else 0.0,
                           tail_mass_max=float(tail.max()) if len(tail) else 0.0)  # fmt: skip
            out["streams"][name] = row
        return out


def _topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    logits = logits.float()
    values, indices = logits.topk(min(k, logits.shape[1]), dim=1)
    return values, indices.int(), torch.logsumexp(logits / temperature, dim=1)


@torch.no_grad()
def fill_teacher_cache(
    model: torch.nn.Module,
    streams: dict,
    forward: Callable[[torch.nn.Module, dict], torch.Tensor],
    backend,
    *,
    batch_size: int,
    temperature: float,
    topk: int,
    budget_bytes: int,
    progress: bool = True,
) -> TeacherCache:
    """Compute ``model``'s outputs (eval mode, no grad) on every row of ``streams`` ({name: stream}), this
    rank's share of each, and gather them. ``model`` must equal the teacher (the student before its first
    step, or the teacher itself)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, stream in streams.items():
            n, world = len(stream), backend.world_size
            mine = torch.arange(n).tensor_split(world)[backend.rank]
            largest = -(-n // world)  # shares differ by at most one row
            steps = -(-largest // batch_size)  # the largest share's batches: the same on every rank
            counts, chunks, top = [], [], False
            held = 0
            for k in tqdm(range(steps), desc=f"teacher outputs: {name}", leave=False,
                          disable=not (progress and backend.is_main)):  # fmt: skip
                rows = mine[k * batch_size : (k + 1) * batch_size]
                real = len(rows) > 0
                batch = stream.get(
                    rows if real else torch.zeros(1, dtype=torch.long)
                )  # a stand-in: discarded
                batch = {key: v.to(backend.device) if torch.is_tensor(v) else v for key, v in batch.items()}
                with backend.autocast():
                    logits = forward(model, batch)
                if not real:
                    continue
                seq = batch.get("sequence")
                per_row = (
                    torch.bincount(seq.cpu(), minlength=len(rows))
                    if seq is not None
                    else torch.ones(len(rows))
                )
                counts.append(per_row.long())
                logits = logits.detach().float().cpu()
                held += logits.numel() * 4
                # beyond the budget (its share of it here), everything kept so far and after becomes top-k
                if not top and held * world > budget_bytes and logits.shape[1] > topk:
                    top = True
                    chunks = [_topk(c, topk, temperature) if torch.is_tensor(c) else c for c in chunks]
                chunks.append(_topk(logits, topk, temperature) if top else logits)
            share = (torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long), chunks, top)
            gathered = backend.gather_object(share)
            top = any(g[2] for g in gathered)  # every rank keeps the same kind
            counts = torch.cat([g[0] for g in gathered])
            parts = [c for g in gathered for c in g[1]]
            if top:
                parts = [_topk(c, topk, temperature) if torch.is_tensor(c) else c for c in parts]
            offsets = torch.zeros(n + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(counts, 0)
            if top:
                values, indices, lse = (torch.cat([p[i] for p in parts]) if parts else torch.zeros(0)
                                        for i in range(3))  # fmt: skip
                out[name] = StreamOutputs(offsets, values, indices, lse)
            else:
                logits = torch.cat(parts) if parts else torch.zeros(0, 0)
                log_p = torch.log_softmax(
                    logits / temperature, dim=1
                )  # what the divergence reads (TeacherProbs)
                probs = log_p.exp()
                out[name] = StreamOutputs(offsets, probs, neg_entropy=(probs * log_p).sum(1))
    finally:
        model.train(was_training)
    return TeacherCache(out, temperature, time.perf_counter() - t0, topk)


def teacher_cache_wanted(method, log) -> bool:
    """Whether the teacher's outputs are computed once (SCRUB's ``method.teacher_cache=auto``) and, when the
    method asked but cannot, why (logged): the method's ``teacher_cache_off`` says."""
    why = method.teacher_cache_off() if method.needs_teacher else ""
    if why:
        log(f"teacher_cache: off, because {why}")
    return why is None
