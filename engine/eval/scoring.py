"""A causal LM's answers scored and its continuations generated, in batches, each rank on its share of the rows
when a backend has several (engine/eval/shard.py): what the TOFU and the text suites (tofu.py, text.py) measure
with, the way open-unlearning does (``src/evals/metrics/utils.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from engine.data.text import IGNORE, QAFormatter, collate
from engine.eval.memorization import from_hits
from engine.eval.shard import is_shared, map_rows
from engine.models.causal_lm import token_logits

if TYPE_CHECKING:
    from engine.backends.base import Backend


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _chunks(n: int, size: int, progress: bool, desc: str) -> Iterator[range]:
    starts = range(0, n, size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for s in starts:
        yield range(s, min(n, s + size))


@torch.no_grad()
def score_answers(model, formatter: QAFormatter, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                  device: str | torch.device = "cpu", token_stats: bool = False, progress: bool = False,
                  backend: Backend | None = None) -> list[dict]:  # fmt: skip
    """Per (question, answer): ``score_encoded`` of the pair, encoded as for training."""
    encoded = [formatter.encode(q, a) for q, a in pairs]
    return score_encoded(model, formatter.tokenizer, encoded, batch_size=batch_size, device=device,
                         token_stats=token_stats, progress=progress, backend=backend)  # fmt: skip


@torch.no_grad()
def score_encoded(model, tok, encoded: Sequence[dict], *, batch_size: int = 16,
                  device: str | torch.device = "cpu", token_stats: bool = False, progress: bool = False,
                  backend: Backend | None = None) -> list[dict]:  # fmt: skip
    """Per encoded example (``input_ids``, ``labels``): ``{"avg_nll", "tokens"}`` = mean NLL over its counted
    tokens (end-of-sequence included, as ``evaluate_probability``) and their number. With ``token_stats`` also
    what the MIA attacks need: ``logp`` (log p of each counted token), ``mu``/``var`` (mean and variance of
    log p under the model's distribution at that position) without the last target, as
    ``tokenwise_logprobs`` drops the EOS prediction; and ``text``, the counted tokens decoded without
    special tokens (zlib's input). With a ``backend`` of several ranks each scores its share of the
    examples and all get every result (engine/eval/shard.py).

    Every row also has, from the same forward (engine/eval/memorization.py), ``exact_memorization`` (the
    share of its counted tokens whose argmax prediction is the token) and ``extraction_strength`` (1 - k/T,
    k the first position from which every argmax prediction is right): floats in [0, 1], or None for a row
    with no counted token. The counted tokens are those whose ``labels`` are not -100, as for ``avg_nll``;
    average them over rows with ``memorization.mean_of``."""
    if is_shared(backend):
        kw = {"batch_size": batch_size, "device": device, "token_stats": token_stats, "progress": progress}
        return map_rows(lambda rows: score_encoded(model, tok, [encoded[i] for i in rows], **kw),
                        len(encoded), batch_size, backend)  # fmt: skip
    out: list[dict] = []
    with eval_mode(model):
        for rows in _chunks(len(encoded), batch_size, progress, "scoring"):
            chunk = [encoded[i] for i in rows]
            batch = {k: v.to(device) for k, v in collate(chunk, _pad_id(tok)).items()}
            logits = token_logits(model, batch).float()  # [N, vocab]
            # the model's own argmax (on the logits: log_softmax could round two near-equal ones together)
            hits = logits.argmax(-1) == batch["labels"]
            logp_all = torch.log_softmax(logits, dim=-1)
            del logits  # one [N, vocab] tensor at a time
            target = logp_all.gather(1, batch["labels"][:, None]).squeeze(1)
            # collate's targets are row-major, so each example's tokens are one contiguous run
            counts = torch.bincount(batch["sequence"], minlength=len(chunk)).tolist()
            if token_stats:
                probs = logp_all.exp()
                mu = (probs * logp_all).sum(-1)
                # = E[lp^2] - mu^2 as open-unlearning writes it, in a form that does not cancel in float32
                var = (probs * (logp_all - mu[:, None]).square()).sum(-1)
                stats = list(zip(target.split(counts), mu.split(counts), var.split(counts), strict=True))
            for i, (lp, hit) in enumerate(zip(target.split(counts), hits.split(counts), strict=True)):
                row = {"avg_nll": float(-lp.mean()), "tokens": len(lp), **from_hits(hit)}
                if token_stats:
                    keep = slice(0, max(len(lp) - 1, 0))
                    row.update(
                        {name: t[keep].cpu().numpy() for name, t in zip(("logp", "mu", "var"), stats[i])}
                    )
                    counted = [t for t in chunk[i]["labels"][1:] if t != IGNORE]
                    row["text"] = tok.decode(counted, skip_special_tokens=True)
                out.append(row)
    return out


@torch.no_grad()
def generate_answers(model, formatter: QAFormatter, questions: Sequence[str], *, batch_size: int = 16,
                     max_new_tokens: int = 64, device: str | torch.device = "cpu", progress: bool = False,
                     backend: Backend | None = None) -> list[str]:  # fmt: skip
    """Greedy answers to ``questions`` (``generate_from_ids`` of their prompts)."""
    prompts = [formatter.prompt_ids(q) for q in questions]
    return generate_from_ids(model, formatter.tokenizer, prompts, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, device=device, progress=progress,
                             backend=backend)  # fmt: skip


@torch.no_grad()
def generate_from_ids(model, tok, prompts: Sequence[Sequence[int]], *, batch_size: int = 16,
                      max_new_tokens: int | Sequence[int] = 64, device: str | torch.device = "cpu",
                      progress: bool = False, backend: Backend | None = None) -> list[str]:  # fmt: skip
    """Greedy continuations of token-id prompts: left-padded (so every row continues from its last prompt
    token) with their attention mask; only the new tokens are decoded (at most ``max_new_tokens``, one limit
    or one per prompt), special tokens skipped, stripped. With a ``backend`` of several ranks each generates
    for its share of the prompts, still in batches, and all get every continuation (engine/eval/shard.py)."""
    pad = _pad_id(tok)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if is_shared(backend):
        kw = {"batch_size": batch_size, "device": device, "progress": progress}
        return map_rows(lambda rows: generate_from_ids(model, tok, [prompts[i] for i in rows],
                                                       max_new_tokens=[limits[i] for i in rows], **kw),
                        len(prompts), batch_size, backend)  # fmt: skip
    texts: list[str] = []
    with eval_mode(model):
        for rows in _chunks(len(prompts), batch_size, progress, "generating"):
            chunk = [list(prompts[i]) for i in rows]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max(limits[i] for i in rows),
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
            # open-unlearning also asks for clean_up_tokenization_spaces, which only moves spaces before
            # punctuation: ROUGE's tokenizer drops punctuation, and transformers 5 ignores it for BPE.
            new = [out[k, width : width + limits[i]].tolist() for k, i in enumerate(rows)]
            texts += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return texts
