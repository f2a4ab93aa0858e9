"""Where one run's files go, worked out in this one place. Beside the output folder ``OUTPUT``:

- ``OUTPUT.partial``: the staging folder the run writes into; renamed to ``OUTPUT`` only when complete
  (export.staged_dir), and left behind by a failed run for inspection and resume;
- ``OUTPUT.partial/checkpoints``: the resumable checkpoints (a training run: one folder per target);
- ``OUTPUT.partial/STOP``: a driver's request to its workers to checkpoint and stop (signals.py);
- ``OUTPUT.tokens``: the tokenized forget/retain rows every process reads by row (text tasks; removed when the
  run ends, whether it succeeds or fails: engine/recipes/session.py);
- ``OUTPUT.ray``: Ray Train's own run records (unless backend.storage_path says elsewhere);
- ``OUTPUT.old``: the previous result, for the instant of an overwrite;
- ``OUTPUT.upload``: what ``output.push_to_hub`` uploads (links to the model's files and the receipt; removed after).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    output: Path

    @classmethod
    def of(cls, output_dir: str | Path) -> RunFolder:
        return cls(Path(output_dir))

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.name + suffix)

    @property
    def partial(self) -> Path:
        return self._beside(".partial")

    @property
    def checkpoints(self) -> Path:
        return self.partial / "checkpoints"

    @property
    def stop_file(self) -> Path:
        return self.partial / "STOP"

    @property
    def tokens(self) -> Path:
        return self._beside(".tokens")

    @property
    def ray(self) -> Path:
        return self._beside(".ray")

    @property
    def old(self) -> Path:
        return self._beside(".old")

    @property
    def upload(self) -> Path:
        return self._beside(".upload")
