"""Backends: where the one loop's tensors live, which rows each process sees, and how a step is taken."""

from __future__ import annotations

from engine.backends.base import Backend
from engine.backends.single import SingleProcessBackend


def build_backend(config) -> Backend:
    if config.name == "single":
        return SingleProcessBackend(
            config.device,
            config.num_threads,
            config.gradient_accumulation_steps,
            config.keep_checkpoints,
            dtype=config.dtype,  # autocast of the forwards (the loop's backend.autocast())
        )
    if config.name == "deepspeed":
        from engine.backends.deepspeed import DeepSpeedBackend  # imports deepspeed: only when asked for

        return DeepSpeedBackend(config)
    from engine.errors import ConfigError

    raise ConfigError(
        f"backend.name={config.name} is a launcher, not a backend a process builds (engine/launch/ray_train.py)"
    )


__all__ = ["Backend", "SingleProcessBackend", "build_backend"]
