"""Unlearning methods. Adding one = one file, one entry below, one config, a loss test."""

from __future__ import annotations

from engine.methods.erm import Erm, ErmConfig
from engine.methods.grad_ascent import GradAscent, GradAscentConfig
from engine.methods.grad_diff import GradDiff, GradDiffConfig
from engine.methods.npo import Npo, NpoConfig
from engine.methods.scrub import Scrub, ScrubConfig

# name -> (config class, method class); a plain dict, no plugin machinery.
METHODS = {
    "scrub": (ScrubConfig, Scrub),
    "erm": (ErmConfig, Erm),
    "grad_ascent": (GradAscentConfig, GradAscent),
    "grad_diff": (GradDiffConfig, GradDiff),
    "npo": (NpoConfig, Npo),
}

MethodConfig = ScrubConfig | ErmConfig | GradAscentConfig | GradDiffConfig | NpoConfig


def build_method(config: MethodConfig):
    return METHODS[config.name][1](config)


__all__ = [
    "METHODS",
    "MethodConfig",
    "build_method",
    "Erm",
    "ErmConfig",
    "GradAscent",
    "GradAscentConfig",
    "GradDiff",
    "GradDiffConfig",
    "Npo",
    "NpoConfig",
    "Scrub",
    "ScrubConfig",
]
