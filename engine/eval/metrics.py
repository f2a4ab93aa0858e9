"""Scores of a classifier on the splits of an unlearning run: errors (percent), the paper's basic
membership attack and SalUn's MIA-efficacy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.eval.attacks import basic_mia, mia_efficacy


@torch.no_grad()
def predict(model, data, transform, batch_size: int, device) -> dict[str, np.ndarray]:
    """Per-example cross-entropy, correctness, true-label probability and logit-scaled confidence
    ``margin`` = log p_y - log(1 - p_y) (the challenge's statistic), in eval mode."""
    was_training = model.training
    model.eval()
    losses, correct, conf, margin = [], [], [], []
    for start in range(0, len(data), batch_size):
        x = transform(data.images[start : start + batch_size]).to(device)
        y = data.labels[start : start + batch_size].to(device)
        logits = model(pixel_values=x).logits.float()
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        correct.append((logits.argmax(-1) == y).cpu())
        conf.append(logits.softmax(-1).gather(1, y[:, None])[:, 0].cpu())
        margin.append(logit_margin(logits, y).cpu())
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return {"loss": cat(losses), "correct": cat(correct), "conf": cat(conf), "margin": cat(margin)}


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p_y - log(1 - p_y) from the logits, without forming p: logit_y - logsumexp of the other
    logits (finite where 1 - p_y rounds to 0 in float32)."""
    others = logits.float().scatter(1, labels[:, None], float("-inf"))
    return logits.float().gather(1, labels[:, None])[:, 0] - others.logsumexp(-1)


def _error(pred: dict) -> float:
    return float(100.0 * (1.0 - pred["correct"].mean())) if len(pred["correct"]) else float("nan")


def evaluate(
    model,
    data,
    transform,
    batch_size: int,
    device,
    attacks: bool = True,
    seed: int = 0,
    predictions: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict:
    """forget / retain / test / val error in percent (+ forget-val and forget-class test error) and,
    with ``attacks``, the basic MIA accuracy and MIA-efficacy in percent.

    Under class unlearning, ``test_error`` is measured on the other classes (the forgotten class's
    test error is ``forget_test_error``), as the paper reports it. ``predictions``: ``predict``'s output
    for every split, already computed (by several ranks, each on its share: engine/tasks/image_classification.py);
    the model is then not run.
    """
    test_labels = data.test.labels.numpy()
    in_forget_classes = np.isin(test_labels, data.forget_classes)
    p = predictions or {
        name: predict(model, getattr(data, name), transform, batch_size, device)
        for name in ("forget", "retain", "val", "forget_val", "test")
    }
    test_kept = ~in_forget_classes if data.forget_kind == "class" else np.ones_like(in_forget_classes)
    sel = lambda pred, m: {k: v[m] for k, v in pred.items()}  # noqa: E731
    out = {
        "forget_error": _error(p["forget"]),
        "retain_error": _error(p["retain"]),
        "test_error": _error(sel(p["test"], test_kept)),
        "val_error": _error(p["val"]),
        "forget_val_error": _error(p["forget_val"]),
        "forget_test_error": _error(sel(p["test"], in_forget_classes)),
    }
    if attacks:
        # Basic MIA: members = forget examples, non-members = test examples of the forget set's classes.
        # MIA-efficacy (SalUn): an attack fit on retain vs the whole test set, applied to the forget set.
        out["mia"] = 100.0 * basic_mia(p["forget"]["loss"], p["test"]["loss"][in_forget_classes], seed=seed)
        out["mia_efficacy"] = 100.0 * mia_efficacy(
            p["retain"]["conf"], p["test"]["conf"], p["forget"]["conf"], seed=seed
        )
    return out
