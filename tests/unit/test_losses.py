"""Loss values against numbers computed by hand (with the math module, not torch)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.methods.losses import cross_entropy_sum, distill_kl_sum, parameter_distance
from engine.methods.scrub import Scrub, ScrubConfig


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 1.0, 0.0], [0.5, 0.5, 0.5]]
Y = [1, 2]


def hand_kl_sum(temperature: float) -> float:
    return temperature**2 * sum(kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(S, T_))


def hand_ce_sum() -> float:
    return sum(-math.log(softmax(s)[y]) for s, y in zip(S, Y))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_divergence_matches_hand_computation(temperature):
    got = distill_kl_sum(
        torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), temperature
    )
    assert got.item() == pytest.approx(hand_kl_sum(temperature), rel=1e-12)


def test_divergence_numbers_written_out():
    # T=2, row 2: teacher uniform (1/3 each); student softmax([0, -.5, 1.5]) = [.1643, .0996, .7361]
    # KL = 1/3 * (ln(.3333/.1643) + ln(.3333/.0996) + ln(.3333/.7361)) = 1/3 * (.7075 + 1.2080 - .7922) = .3744
    # row 1: teacher softmax([1, .5, 0]) = [.5065, .3072, .1863], student softmax([.5, 1, .25]) = [.2918, .4810, .2272]
    # KL = .5065 ln(.5065/.2918) + .3072 ln(.3072/.4810) + .1863 ln(.1863/.2272) = .2794 - .1377 - .0370 = .1046
    # T^2 * (.1046 + .3744) = 4 * .4790 = 1.9162
    got = distill_kl_sum(torch.tensor(S), torch.tensor(T_), 2.0)
    assert got.item() == pytest.approx(1.9162, abs=5e-4)


def test_divergence_is_zero_at_the_teacher_and_batchmean_is_sum_over_n():
    t = torch.tensor(T_)
    assert distill_kl_sum(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor(S)
    batchmean = F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean") * 16
    assert (distill_kl_sum(s, t, 4.0) / 2).item() == pytest.approx(batchmean.item(), rel=1e-6)


def test_cross_entropy_sum_matches_hand_computation():
    got = cross_entropy_sum(torch.tensor(S, dtype=torch.float64), torch.tensor(Y))
    assert got.item() == pytest.approx(hand_ce_sum(), rel=1e-12)


def test_scrub_step_losses():
    cfg = ScrubConfig(temperature=2.0, gamma=0.7, alpha=0.3)
    scrub = Scrub(cfg)
    s, t, y = torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), torch.tensor(Y)
    mx = scrub.loss("max", s, t, y)
    mn = scrub.loss("min", s, t, y)
    assert mx.count == mn.count == 2
    assert mx.total.item() == pytest.approx(-hand_kl_sum(2.0), rel=1e-12)  # labels unused, weight 1
    assert mn.total.item() == pytest.approx(0.7 * hand_ce_sum() + 0.3 * hand_kl_sum(2.0), rel=1e-12)
    with pytest.raises(ValueError, match="phases"):
        scrub.loss("sideways", s, t, y)


def test_parameter_distance_is_sum_of_unsquared_frobenius_norms():
    a = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1.0])]
    b = [torch.zeros(2, 2), torch.tensor([4.0])]
    assert parameter_distance(a, b).item() == pytest.approx(math.sqrt(30) + 3.0)
    assert parameter_distance(a, a).item() == 0.0


def test_penalty_off_by_default_and_scaled_when_on():
    lin_a, lin_b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    assert Scrub(ScrubConfig()).penalty(lin_a, lin_b) is None
    expected = 0.5 * parameter_distance(list(lin_a.parameters()), list(lin_b.parameters()))
    assert Scrub(ScrubConfig(param_distance=0.5)).penalty(lin_a, lin_b).item() == pytest.approx(
        expected.item()
    )
