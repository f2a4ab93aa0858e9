"""The per-epoch schedule: learning-rate decay (strict >), max-before-min phases, SCRUB+R selection."""

from __future__ import annotations

import pytest

from engine.methods.scrub import Scrub, ScrubConfig, select_rewind_epoch


def test_learning_rate_decays_after_each_decay_epoch_strictly():
    cfg = ScrubConfig(lr=1.0, lr_decay_epochs=[3, 5, 9], lr_decay_rate=0.1, epochs=10, msteps=3)
    got = [cfg.lr_at(e) for e in range(1, 11)]
    want = [1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001]
    assert got == pytest.approx(want)


def test_paper_small_scale_schedule():
    cfg = ScrubConfig(optimizer="adam", lr=5e-4, lr_decay_epochs=[5, 8, 9], epochs=10, msteps=3)
    assert [cfg.lr_at(e) for e in (5, 6, 8, 9, 10)] == pytest.approx([5e-4, 5e-5, 5e-5, 5e-6, 5e-7])


def test_max_epochs_first_then_min_only_epochs():
    scrub = Scrub(ScrubConfig(epochs=5, msteps=2, forget_batch_size=7, retain_batch_size=3))
    assert [[(p.name, p.stream, p.batch_size) for p in scrub.phases(e)] for e in range(1, 6)] == [
        [("max", "forget", 7), ("min", "retain", 3)],
        [("max", "forget", 7), ("min", "retain", 3)],
        [("min", "retain", 3)],
        [("min", "retain", 3)],
        [("min", "retain", 3)],
    ]


def test_msteps_cannot_exceed_epochs():
    with pytest.raises(ValueError, match="msteps"):
        ScrubConfig(epochs=2, msteps=3)


@pytest.mark.parametrize(
    ("errors", "target", "epoch"),
    [
        ([10.0, 40.0, 90.0, 99.0], 41.0, 1),  # closest
        ([30.0, 40.0, 90.0], 5.0, 0),  # the original (epoch 0) can win
        ([10.0, 30.0, 50.0], 40.0, 1),  # tie between 1 and 2: earliest
        ([20.0, 20.0, 60.0], 20.0, 0),  # exact tie including epoch 0: epoch 0
        ([0.0, 50.0, 100.0], 100.0, 2),  # the final epoch
    ],
)
def test_rewind_picks_the_closest_epoch_earliest_on_ties(errors, target, epoch):
    assert select_rewind_epoch(errors, target) == epoch


def test_rewind_needs_epoch_zero():
    with pytest.raises(ValueError):
        select_rewind_epoch([], 1.0)
