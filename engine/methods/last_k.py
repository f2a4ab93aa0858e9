"""CF-k and EU-k (Goel et al. 2022, as the SCRUB paper's baselines): only the last k blocks train, on D_r.

- CF-k (catastrophic forgetting-k): fine-tune the last k blocks from the original's weights.
- EU-k (exact unlearning-k): re-initialise the last k blocks (weights and BatchNorm statistics from a
  fresh model of the same class, as Retrain) and train them from scratch.

The other blocks are frozen as a fixed function: no gradients (so they are outside the optimizer and
their weights stay bit-identical) and eval-mode BatchNorm (their running statistics stay those of the
original). ``engine.methods.blocks`` says what a block is; k=2 is the last residual block (ResNet) or
last conv unit (All-CNN) plus the head.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.methods.base import MethodContext
from engine.methods.blocks import freeze_all_but_last, last_blocks, reinitialise
from engine.methods.erm import Erm, ErmConfig
from engine.methods.finetune import FinetuneConfig

_K = (
    "Blocks trained (the last k of engine.methods.blocks: the model's children with Sequential/ModuleList "
    "flattened one level, parameter-holding only; the head is the last). 2 = last residual block + head "
    "for the pre-activation ResNet (11 blocks), last conv unit + head for All-CNN (9 blocks)."
)


class CfKConfig(FinetuneConfig):
    """Defaults: 10 epochs of SGD lr 0.01, as the paper's Finetune (CF-k is fine-tuning with frozen blocks)."""

    name: Literal["cf_k"] = Field("cf_k", description="Method name.")
    k: int = Field(2, ge=1, description=_K)


class EuKConfig(ErmConfig):
    """Defaults: 10 epochs of SGD lr 0.05 decayed after 5 and 8, with augmentation: the last k blocks are
    trained from scratch, as Retrain trains the whole network."""

    name: Literal["eu_k"] = Field("eu_k", description="Method name.")
    k: int = Field(2, ge=1, description=_K)
    epochs: int = Field(10, ge=1, description="Epochs over D_r.")
    lr_decay_epochs: list[int] = Field(
        default_factory=lambda: [5, 8], description="Epochs after which the lr decays."
    )


class CfK(Erm):
    """ERM on D_r with all but the last k blocks frozen."""

    needs_teacher = False
    needs = ("classifier_head",)  # the last k blocks of an image classifier
    prepares_student = True

    def check_model(self, student) -> None:
        last_blocks(student, self.config.k)  # a k beyond the model is refused before any work

    def prepare(self, student, ctx: MethodContext) -> None:
        freeze_all_but_last(student, self.config.k)


class EuK(Erm):
    """ERM on D_r of the re-initialised last k blocks, the rest frozen."""

    needs_teacher = False
    needs = ("classifier_head",)  # the last k blocks of an image classifier
    prepares_student = True

    def check_model(self, student) -> None:
        last_blocks(student, self.config.k)

    def prepare(self, student, ctx: MethodContext) -> None:
        reinitialise(student, last_blocks(student, self.config.k))
        freeze_all_but_last(student, self.config.k)
