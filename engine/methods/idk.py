"""The "I don't know" baselines of TOFU (Maini et al. 2024), each forget question paired with one of TOFU's
refusal answers (``idontknow.jsonl``, or ``method.idk_file``; the answer of a row is fixed by a hash of the run's
seed and the row's id: engine/data/paired.py ``idk_choice``):

- IdkNLL: fine-tune the forget questions to their "I don't know" answers while holding the retain answers:
  loss = gamma * NLL_idk + alpha * NLL_retain, each a token mean over its own answers (the TOFU repository's
  ``idk`` loss is one token mean over both halves; open-unlearning's form for every retain-regularised method
  keeps two).
- IdkDPO: DPO (Rafailov et al. 2023) with the "I don't know" answer preferred and the forget answer dispreferred,
  against the frozen original as the reference model: loss = gamma * mean_pairs[-2/beta * log sigmoid(beta *
  (log pi(idk)/pi_ref(idk) - log pi(y)/pi_ref(y)))] + alpha * NLL_retain, each log pi summed over a whole answer
  (open-unlearning's ``DPO`` trainer, src/trainer/unlearn/dpo.py, with its IdkDPO experiment; its 2/beta scale,
  as NPO's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from engine.methods.base import LossTerms, Method, Phase
from engine.methods.grad_diff import GradDiffConfig
from engine.methods.losses import cross_entropy_sum, dpo_sum, sequence_nll


class IdkNllConfig(GradDiffConfig):
    """gamma 1, alpha 1 (the TOFU repository's idk loss weighs both halves alike); AdamW, lr 1e-5, weight decay
    0.01, 10 epochs, batch 32 as every language-model baseline here (open-unlearning's tofu/idk.yaml)."""

    name: Literal["idk_nll"] = Field("idk_nll", description="Method name.")
    gamma: float = Field(1.0, ge=0, description="Weight of the \"I don't know\" answers' NLL.")
    idk_file: str | None = Field(
        None,
        description="A local file of \"I don't know\" answers, one a line; unset: TOFU's idontknow.jsonl beside "
        "its splits (data.preset=tofu only).",
    )

    def check_run(self, run: Any) -> None:
        what = f"method={self.name}"
        if run.data.text_column or run.data.preset not in (None, "tofu"):
            raise ValueError(f"{what} answers questions with \"I don't know\": it needs prompt/answer pairs "
                             "(data.prompt_column and data.answer_column), not raw documents")  # fmt: skip
        if self.idk_file is None and run.data.preset != "tofu":
            raise ValueError(f"{what} needs \"I don't know\" answers: set method.idk_file=FILE (one answer a "
                             "line); only TOFU (data.preset=tofu) ships its own")  # fmt: skip
        if self.idk_file is not None and not Path(self.idk_file).is_file():
            raise ValueError(f"method.idk_file={self.idk_file!r} is not a file: give the \"I don't know\" answers, "
                             "one a line")  # fmt: skip
        if run.backend.name == "ray":
            raise ValueError(f"{what} is not served on backend.name=ray (its workers read the forget and retain "
                             "token stores only): use backend.name=deepspeed or single")  # fmt: skip


class IdkDpoConfig(IdkNllConfig):
    """beta 0.1, gamma 1, alpha 1: open-unlearning's configs/trainer/DPO.yaml; lr 1e-5, weight decay 0.01, 10
    epochs: its configs/experiment/unlearn/tofu/idk.yaml."""

    name: Literal["idk_dpo"] = Field("idk_dpo", description="Method name.")
    beta: float = Field(0.1, gt=0, description="DPO's inverse temperature beta.")
    gamma: float = Field(1.0, ge=0, description="Weight of the preference (DPO) term.")


def _idk_batch(batch, who: str) -> None:
    if batch is None or "is_idk" not in batch:
        raise ValueError(
            f"{who} needs paired batches with the forget rows' \"I don't know\" answers (is_idk)"
        )


class IdkNll(Method):
    needs_teacher = False
    needs = ("paired", "idk")
    idk_with_forget: ClassVar[bool] = False  # the forget answers themselves are never read: not in the batch

    def __init__(self, config: IdkNllConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    parts = ("idk", "retain")  # token means over the idk answers and over the retain answers

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        idk, forget = batch["idk_token"], batch["forget_token"]
        return int(idk.sum()), int((~idk & ~forget).sum())

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        _idk_batch(batch, "IdkNLL")
        idk, r = batch["idk_token"], ~batch["idk_token"] & ~batch["forget_token"]
        learn = c.gamma * cross_entropy_sum(student_logits[idk], labels[idk])
        retain = c.alpha * cross_entropy_sum(student_logits[r], labels[r])
        return LossTerms(total=learn + retain, count=int(labels.shape[0]), parts=(learn, retain))


class IdkDpo(Method):
    needs_teacher = True  # the reference model pi_ref = the frozen original
    needs = ("teacher", "paired", "idk")
    idk_with_forget: ClassVar[bool] = True  # the dispreferred answers

    def __init__(self, config: IdkDpoConfig):
        self.config = config

    def phases(self, epoch: int) -> list[Phase]:
        return [Phase("paired", "paired", self.config.batch_size)]

    parts = ("forget", "retain")  # a mean over the preference pairs, a token mean over the retain answers

    def part_counts(self, phase, batch: dict) -> tuple[int, int]:
        return int(batch["is_forget"].sum()), int((~batch["forget_token"] & ~batch["idk_token"]).sum())

    def loss(self, phase, student_logits, teacher_logits, labels, batch=None) -> LossTerms:
        c = self.config
        _idk_batch(batch, "IdkDPO")
        n = int(batch["is_forget"].shape[0])
        seq, is_f, is_idk = batch["sequence"], batch["is_forget"], batch["is_idk"]
        nll = sequence_nll(student_logits, labels, seq, n)
        ref = sequence_nll(teacher_logits.detach(), labels, seq, n)
        # the forget block and the idk block hold the same rows in the same order: pair i is (idk i, forget i)
        prefer = c.gamma * dpo_sum(nll[is_idk], ref[is_idk], nll[is_f], ref[is_f], c.beta)
        r = ~batch["forget_token"] & ~batch["idk_token"]
        retain = c.alpha * cross_entropy_sum(student_logits[r], labels[r])
        return LossTerms(total=prefer + retain, count=int(labels.shape[0]), parts=(prefer, retain))
