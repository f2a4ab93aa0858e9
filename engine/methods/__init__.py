"""Unlearning methods. Adding one = one file (its config and its ``Method``), one entry in METHODS below, a loss
test (docs/layout.md, "Adding a method")."""

from __future__ import annotations

from typing import Union

from engine.methods.bad_teacher import BadTeacher, BadTeacherConfig
from engine.methods.base import Method
from engine.methods.erm import Erm, ErmConfig
from engine.methods.finetune import Finetune, FinetuneConfig
from engine.methods.fisher import Fisher, FisherConfig
from engine.methods.grad_ascent import GradAscent, GradAscentConfig
from engine.methods.grad_diff import GradDiff, GradDiffConfig
from engine.methods.idk import IdkDpo, IdkDpoConfig, IdkNll, IdkNllConfig
from engine.methods.last_k import CfK, CfKConfig, EuK, EuKConfig
from engine.methods.neggrad_plus import NegGradPlus, NegGradPlusConfig
from engine.methods.npo import Npo, NpoConfig
from engine.methods.retrain import Retrain, RetrainConfig
from engine.methods.rmu import Rmu, RmuConfig
from engine.methods.scrub import Scrub, ScrubConfig
from engine.methods.simnpo import SimNpo, SimNpoConfig
from engine.methods.undial import Undial, UndialConfig

# name -> (config class, method class); a plain dict, no plugin machinery.
METHODS = {
    "scrub": (ScrubConfig, Scrub),
    "erm": (ErmConfig, Erm),
    "grad_ascent": (GradAscentConfig, GradAscent),
    "grad_diff": (GradDiffConfig, GradDiff),
    "npo": (NpoConfig, Npo),
    "rmu": (RmuConfig, Rmu),
    "simnpo": (SimNpoConfig, SimNpo),
    "undial": (UndialConfig, Undial),
    "idk_nll": (IdkNllConfig, IdkNll),
    "idk_dpo": (IdkDpoConfig, IdkDpo),
    # the SCRUB paper's vision baselines (those that need a classifier head: task=image_classification)
    "retrain": (RetrainConfig, Retrain),
    "finetune": (FinetuneConfig, Finetune),
    "neggrad_plus": (NegGradPlusConfig, NegGradPlus),
    "cf_k": (CfKConfig, CfK),
    "eu_k": (EuKConfig, EuK),
    "bad_teacher": (BadTeacherConfig, BadTeacher),
    "fisher": (FisherConfig, Fisher),
}

# the run config's `method` section: any of their configs, told apart by `name` (engine/config/schema.py)
MethodConfig = Union[tuple(config for config, _ in METHODS.values())]  # noqa: UP007 (a union built from the table)


def build_method(config) -> Method:
    return METHODS[config.name][1](config)


__all__ = [
    "METHODS",
    "MethodConfig",
    "build_method",
    "BadTeacher",
    "BadTeacherConfig",
    "CfK",
    "CfKConfig",
    "Erm",
    "ErmConfig",
    "EuK",
    "EuKConfig",
    "Finetune",
    "FinetuneConfig",
    "Fisher",
    "FisherConfig",
    "GradAscent",
    "GradAscentConfig",
    "GradDiff",
    "GradDiffConfig",
    "IdkDpo",
    "IdkDpoConfig",
    "IdkNll",
    "IdkNllConfig",
    "NegGradPlus",
    "NegGradPlusConfig",
    "Npo",
    "NpoConfig",
    "Retrain",
    "RetrainConfig",
    "Rmu",
    "RmuConfig",
    "Scrub",
    "ScrubConfig",
    "SimNpo",
    "SimNpoConfig",
    "Undial",
    "UndialConfig",
]
