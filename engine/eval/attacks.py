"""Membership-inference attacks used to judge unlearning (numpy + scikit-learn only).

Two attacks, each a faithful port of the reference code it is named after:

* :func:`basic_mia`: the SCRUB paper's "basic" attack (Kurmanji et al., 2023; `meghdadk/SCRUB`, function
  `membership_inference_attack` + `evaluate_attack_model` in its notebooks). It asks: can a logistic regression on
  the per-example loss tell forget examples apart from unseen test examples of the same classes? After perfect
  unlearning it cannot, so the ideal value is Retrain's (about 0.5 for class unlearning).
* :func:`mia_efficacy`: SalUn's "MIA-efficacy" (Fan et al., 2024; `OPTML-Group/Unlearn-Saliency`,
  `Classification/evaluation/SVC_MIA.py`, reported as `SVC_MIA_forget_efficacy["confidence"]`). An SVC learns
  members (retain) vs non-members (test) from the true-label confidence and is applied to the forget set; the score
  is the fraction of forget examples it calls non-members. Higher means more forgetting; compare with Retrain's.

Both take per-example statistics that the caller computed with the model in eval mode, so this module never sees a
model and stays cheap to test.
"""

from __future__ import annotations

import random

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
from sklearn.svm import SVC

__all__ = ["basic_mia", "mia_efficacy", "min_mia_group_size"]

# The authors clip the loss feature to [-100, 100] before fitting (a loss of +inf, from a probability of exactly 0,
# would otherwise break the logistic regression). Cross-entropy is >= 0, so only the upper bound ever acts.
_LOSS_CLIP = 100.0


def min_mia_group_size(n_splits: int = 5) -> int:
    """Smallest group size :func:`basic_mia` accepts, after balancing.

    With balanced groups of size m there are 2m examples; ``StratifiedShuffleSplit``'s default ``test_size=0.1``
    holds out ceil(0.2 m) of them. Scikit-learn needs at least one example of each class in the held-out part, so
    m >= 6 is the hard floor. We ask for at least ``2 * n_splits`` (10 for the usual 5 splits) besides: below that a
    held-out fold has 2 examples, the accuracy can only be 0, 0.5 or 1, and the mean over folds is mostly noise.
    """
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    return max(6, 2 * n_splits)


def _as_finite_1d(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN: compute the per-example statistics again (a diverged model?)")
    return arr


def basic_mia(
    member_losses: ArrayLike,
    nonmember_losses: ArrayLike,
    seed: int = 0,
    n_splits: int = 5,
) -> float:
    """The SCRUB paper's basic membership-inference attack; returns the attack's accuracy in [0, 1].

    Definition (as in the authors' code):

    1. Members (label 1) are the forget examples, non-members (label 0) the test examples *of the forget set's
       classes* (the caller selects them); the single feature is each example's cross-entropy loss under the
       model being judged, clipped to [-100, 100].
    2. The two groups are balanced by drawing, without replacement, as many examples of the larger group as the
       smaller one has. The authors call ``random.seed(seed)`` then ``random.sample(larger, len(smaller))``; we use
       ``random.Random(seed).sample`` over the indices, which draws the same examples in the same order.
    3. ``cross_val_score(LogisticRegression(), X, y, cv=StratifiedShuffleSplit(n_splits=5, random_state=seed))``
       with sklearn's default ``test_size`` (0.1) and accuracy as the score (the authors' ``cm_score`` computes
       (TP + TN) / total from the confusion matrix, i.e. plain accuracy). The result is the mean over the splits
       (the authors print ``np.mean(MIA)``; papers show it in percent).

    0.5 means the attack cannot tell forget from unseen data (the goal: match Retrain's value); 1.0 means every
    forget example is recognisable as a training member.

    Args:
        member_losses: per-example loss on the forget set.
        nonmember_losses: per-example loss on the test examples of the forget set's classes.
        seed: seeds the balancing draw and the cross-validation splits; the result is deterministic given it.
        n_splits: number of shuffle-split rounds (the authors use 5).

    Raises:
        ValueError: a group is smaller than :func:`min_mia_group_size` or holds NaN.
    """
    members = _as_finite_1d(member_losses, "member_losses")
    nonmembers = _as_finite_1d(nonmember_losses, "nonmember_losses")
    minimum = min_mia_group_size(n_splits)
    for name, group in (("members (forget set)", members), ("non-members (test set)", nonmembers)):
        if group.size < minimum:
            raise ValueError(
                f"basic_mia needs at least {minimum} {name} examples for {n_splits}-split cross-validation, got "
                f"{group.size}; use a larger forget set or more test examples of the forget classes"
            )

    # Balance: subsample the larger group (the authors' order of checks: forget first, then test).
    rng = random.Random(seed)
    if members.size > nonmembers.size:
        members = members[rng.sample(range(members.size), nonmembers.size)]
    elif nonmembers.size > members.size:
        nonmembers = nonmembers[rng.sample(range(nonmembers.size), members.size)]

    # Same row order as the authors: non-members first, then members.
    features = np.clip(np.concatenate([nonmembers, members]), -_LOSS_CLIP, _LOSS_CLIP).reshape(-1, 1)
    labels = np.repeat([0, 1], [nonmembers.size, members.size])

    cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=seed)
    scores = cross_val_score(LogisticRegression(), features, labels, cv=cv, scoring="accuracy")
    return float(np.mean(scores))


def mia_efficacy(
    retain_conf: ArrayLike,
    test_conf: ArrayLike,
    forget_conf: ArrayLike,
    seed: int = 0,
) -> float:
    """SalUn's MIA-efficacy: the fraction of forget examples an attack classifies as NON-members, in [0, 1].

    Definition (SalUn's ``SVC_MIA`` with ``target_train=None, target_test=forget``, "confidence" feature):

    1. The feature is the model's confidence on the true label, softmax(logits)[y], one column.
    2. Shadow members (label 1): retain examples, as many as there are test examples. SalUn takes the first
       ``len(test)`` retain examples (``Subset(retain, range(len(test)))``); we draw them at random without
       replacement (seeded), which does not depend on how the retain set happens to be ordered. When the retain set
       is the smaller one it is used whole.
    3. Shadow non-members (label 0): the test examples. SalUn uses the whole test set, all classes included.
    4. ``SVC(C=3, gamma="auto", kernel="rbf")`` is fitted on the shadow data and applied to the forget examples;
       the result is ``1 - mean(prediction)``, the share predicted "non-member". SalUn reports it times 100.

    Higher means the forget set looks more like unseen data; the target is Retrain's value, not 1. Fitting an RBF
    SVC is quadratic-ish in 2 * len(test) (tens of seconds for a 10k test set).

    Args:
        retain_conf: true-label confidences on the retain set.
        test_conf: true-label confidences on the test set.
        forget_conf: true-label confidences on the forget set.
        seed: seeds the retain subsample; the SVC itself is deterministic.

    Raises:
        ValueError: an input is empty or holds NaN.
    """
    retain = _as_finite_1d(retain_conf, "retain_conf")
    test = _as_finite_1d(test_conf, "test_conf")
    forget = _as_finite_1d(forget_conf, "forget_conf")
    for name, group in (("retain_conf", retain), ("test_conf", test), ("forget_conf", forget)):
        if group.size == 0:
            raise ValueError(f"mia_efficacy needs a non-empty {name}")

    if retain.size > test.size:
        idx = np.random.default_rng(seed).choice(retain.size, size=test.size, replace=False)
        retain = retain[np.sort(idx)]

    features = np.concatenate([retain, test]).reshape(-1, 1)
    labels = np.concatenate([np.ones(retain.size), np.zeros(test.size)])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(features, labels)
    predicted_member = clf.predict(forget.reshape(-1, 1))
    return float(1.0 - np.mean(predicted_member))
