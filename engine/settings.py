"""The base of every settings class (a method's, LoRA's, each section of the run config): unknown keys are errors,
so a typo in a config is never silently ignored, and assignments are validated too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
