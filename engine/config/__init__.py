"""The typed run configuration: schema.py (one section per concern, every field with its help), loading.py (YAML +
``key=value`` overrides, unknown keys refused with a suggestion), rules.py (every refusal that needs no model, per
command, before any work), deepspeed.py (the DeepSpeed JSON a run takes), shipped.py (the packaged configs)."""

from engine.config.loading import METHOD_TAGS, dump_config, load_config
from engine.config.rules import check, train_targets
from engine.config.schema import (
    AuditConfig,
    BackendConfig,
    DataConfig,
    EvalConfig,
    ForgetConfig,
    LoggingConfig,
    ModelConfig,
    RunConfig,
)
from engine.config.shipped import resolve_shipped, shipped_configs

__all__ = [
    "METHOD_TAGS",
    "AuditConfig",
    "BackendConfig",
    "DataConfig",
    "EvalConfig",
    "ForgetConfig",
    "LoggingConfig",
    "ModelConfig",
    "RunConfig",
    "check",
    "dump_config",
    "load_config",
    "resolve_shipped",
    "shipped_configs",
    "train_targets",
]
