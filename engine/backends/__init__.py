"""Backends: where the one loop's tensors live and how they are stepped."""

from __future__ import annotations

from engine.backends.single import SingleProcessBackend


def build_backend(config):
    if config.name == "single":
        return SingleProcessBackend(device=config.device, num_threads=config.num_threads)
    raise ValueError(f"unknown backend {config.name!r}")


__all__ = ["SingleProcessBackend", "build_backend"]
