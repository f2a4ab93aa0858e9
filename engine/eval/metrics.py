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


def error_percent(pred: dict) -> float:
    """Percent of ``predict``'s rows classified wrongly (NaN for no rows)."""
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
    """forget / retain / test / val error in percent (+ forget-val and forget-class test error, and
    ``forget_target_error``: ``unseen_error`` of the forget set's classes) and, with ``attacks``, the basic
    MIA accuracy and MIA-efficacy in percent.

    Under class unlearning, ``test_error`` is measured on the other classes (the forgotten class's
    test error is ``forget_test_error``), as the paper reports it. ``predictions``: ``predict``'s output
    for every split, already computed (by several ranks, each on its share: engine/tasks/image_classification.py);
    the model is then not run.
    """
    test_labels = data.test.labels.numpy()
    in_forget_classes = np.isin(test_labels, data.forget_classes)
    names = ("forget", "retain", "val", "forget_val", "test")
    names += ("forgotten",) if getattr(data, "forgotten", None) is not None else ()
    p = predictions or {
        name: predict(model, getattr(data, name), transform, batch_size, device) for name in names
    }
    test_kept = ~in_forget_classes if data.forget_kind == "class" else np.ones_like(in_forget_classes)
    sel = lambda pred, m: {k: v[m] for k, v in pred.items()}  # noqa: E731
    out = {
        "forget_error": error_percent(p["forget"]),
        "retain_error": error_percent(p["retain"]),
        "test_error": error_percent(sel(p["test"], test_kept)),
        "val_error": error_percent(p["val"]),
        "forget_val_error": error_percent(p["forget_val"]),
        "forget_test_error": error_percent(sel(p["test"], in_forget_classes)),
    }
    # what the forget set would show on a model that never saw it (the calibrated schedule's target)
    forget_labels, retain_labels = data.forget.labels.numpy(), data.retain.labels.numpy()
    out["forget_target_error"] = unseen_error(
        forget_labels, data.val.labels.numpy(), p["val"]["correct"],
        unseen_classes=np.setdiff1d(forget_labels, retain_labels),
    )  # fmt: skip
    if "forgotten" in names:
        out.update(forgotten_scores(p, data, test_labels, attacks, seed))
    if attacks:
        # Basic MIA: members = forget examples, non-members = test examples of the forget set's classes.
        # MIA-efficacy (SalUn): an attack fit on retain vs the whole test set, applied to the forget set.
        out["mia"] = 100.0 * basic_mia(p["forget"]["loss"], p["test"]["loss"][in_forget_classes], seed=seed)
        out["mia_efficacy"] = 100.0 * mia_efficacy(
            p["retain"]["conf"], p["test"]["conf"], p["forget"]["conf"], seed=seed
        )
    return out


def forgotten_scores(p: dict, data, test_labels: np.ndarray, attacks: bool, seed: int) -> dict:
    """A stream of deletion requests (``data.forgotten``: every example forgotten up to this version).
    ``forgotten_error``: the error on them; ``forgotten_val_error``: ``unseen_error`` of their class mix (validation
    error per class, 100 for a class the retain set no longer holds, weighted by the forgotten set's class
    counts): what a model that never saw them would show, the reference `ledger.retrain_bound` measures drift
    from; ``forgotten_mia``: the basic attack, forgotten examples vs test examples of their classes."""
    labels = data.forgotten.labels.numpy()
    classes = np.unique(labels)
    unseen = np.setdiff1d(classes, data.retain.labels.numpy())
    out = {
        "forgotten_error": error_percent(p["forgotten"]),
        "forgotten_val_error": unseen_error(labels, data.val.labels.numpy(), p["val"]["correct"], unseen),
    }
    if attacks:
        test_loss = p["test"]["loss"][np.isin(test_labels, classes)]
        out["forgotten_mia"] = 100.0 * basic_mia(p["forgotten"]["loss"], test_loss, seed=seed)
    return out


def unseen_error(
    labels: np.ndarray, val_labels: np.ndarray, val_correct: np.ndarray, unseen_classes=()
) -> float:
    """The error (percent) a set with class labels ``labels`` shows on a model that never saw it: per class c,
    weighted by c's count in ``labels``, the model's error on the validation examples of c (never trained on;
    ``val_correct`` per validation example), or 100 for c in ``unseen_classes`` (classes the model is no longer
    trained on at all: a model that never saw c cannot predict it). NaN when a class that needs its validation
    error has no validation example."""
    classes, counts = np.unique(labels, return_counts=True)
    if not len(classes):
        return float("nan")
    unseen = set(np.asarray(unseen_classes).tolist())
    val_wrong = 1.0 - np.asarray(val_correct, dtype=float)
    per_class = [
        1.0 if c in unseen else val_wrong[val_labels == c].mean() if (val_labels == c).any() else np.nan
        for c in classes.tolist()
    ]
    return float(100.0 * np.dot(counts / counts.sum(), per_class))
