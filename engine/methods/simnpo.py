"""SimNPO (Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning"; open-unlearning ``SimNPO``): NPO without a reference model, its log-probability normalised by the
answer's length, with a margin: loss = gamma * mean_seq[-2/beta * log sigmoid(beta * (nll(y|x) / |y| - delta))]
+ alpha * NLL_retain, where nll is the summed next-token NLL of the whole forget answer and |y| its tokens (the
paper's -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma') with its margin gamma' = beta * delta, as the
authors' code and open-unlearning's src/trainer/unlearn/simnpo.py write it)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from engine.methods.grad_diff import GradDiffConfig
from engine.methods.losses import simnpo_sum
from engine.methods.npo import Npo


class SimNpoConfig(GradDiffConfig):
    """beta, delta, gamma and alpha: open-unlearning's configs/trainer/SimNPO.yaml (beta 4.5, delta 0, gamma =
    npo_coeff 0.125, alpha 1; the authors' TOFU/config/forget.yaml); optimizer, lr 1e-5, weight decay 0.01, 10
    epochs: its configs/experiment/unlearn/tofu/default.yaml (as every language-model baseline here)."""

    name: Literal["simnpo"] = Field("simnpo", description="Method name.")
    beta: float = Field(4.5, gt=0, description="SimNPO's inverse temperature beta.")
    delta: float = Field(
        0.0, ge=0, description="The margin on the per-token NLL (the paper's gamma is beta * delta)."
    )
    gamma: float = Field(0.125, ge=0, description="Weight of the forget term (open-unlearning's npo_coeff).")
    alpha: float = Field(1.0, ge=0, description="Weight of the retain NLL term.")


class SimNpo(Npo):
    """NPO's paired batches, parts and retain term; only the forget term differs (and needs no teacher)."""

    needs_teacher = False  # reference-free
    needs = ("paired",)
    label = "SimNPO"

    def forget_sum(self, nll: torch.Tensor, teacher_logits, labels, seq, n: int, is_f) -> torch.Tensor:
        lengths = torch.bincount(seq, minlength=n)[is_f]  # |y|: each forget answer's counted tokens
        return simnpo_sum(nll, lengths, self.config.beta, self.config.delta)
