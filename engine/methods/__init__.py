"""Unlearning methods. Adding one = one file, one entry below, one config, a loss test."""

from __future__ import annotations

from engine.methods.erm import Erm, ErmConfig
from engine.methods.scrub import Scrub, ScrubConfig

# name -> (config class, method class); a plain dict, no plugin machinery.
METHODS = {"scrub": (ScrubConfig, Scrub), "erm": (ErmConfig, Erm)}

MethodConfig = ScrubConfig | ErmConfig


def build_method(config: MethodConfig):
    return METHODS[config.name][1](config)


__all__ = ["METHODS", "MethodConfig", "build_method", "Scrub", "ScrubConfig", "Erm", "ErmConfig"]
