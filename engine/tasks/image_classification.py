"""Image classification: any ``AutoModelForImageClassification`` checkpoint and the paper's CIFAR nets.

Rows are images with a label (engine/data/vision.py: per-class validation hold-out, forget/retain by
class, count, fraction or ids); the forward returns class logits; the evaluation is the field's errors
(forget, retain, test, validation; in percent) and membership attacks (engine/eval/metrics.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.artifacts.export import image_processor, run_card, save_checkpoint
from engine.config import train_targets
from engine.data.vision import ImageSet, ImageStream, ImageTransform, UnlearningData, prepare_data
from engine.eval import registry
from engine.eval.metrics import error_percent, evaluate, predict
from engine.eval.shard import is_shared, share
from engine.methods.base import MethodContext
from engine.models.loading import (
    build_classifier,
    classifier_logits,
    image_settings,
    load_classifier,
    resolve_model,
)
from engine.tasks.base import Task, config_key

if TYPE_CHECKING:
    from engine.backends.base import Backend

SPLITS = ("forget", "retain", "val", "forget_val", "test")  # what engine/eval/metrics.py evaluates on


def splits(data: UnlearningData) -> tuple[str, ...]:
    """SPLITS, and ``forgotten`` (every id forgotten up to this version) when a request stream gave earlier ids."""
    return SPLITS + (("forgotten",) if data.forgotten is not None else ())


def load_data_and_transform(cfg, model_path: str | None):
    # the model is checked (a readable folder, or a hub id resolved to a commit) before the data is read
    revision = (
        resolve_model(model_path, cfg.model.revision, config_key(cfg, model_path)) if model_path else None
    )
    data = prepare_data(cfg.data, cfg.forget)
    image = image_settings(model_path, cfg.data.mean, cfg.data.std, cfg.data.image_size, revision)
    return data, image, ImageTransform(image["mean"], image["std"], image["size"])


def shared_predictions(
    model: torch.nn.Module,
    data: UnlearningData,
    transform: ImageTransform,
    batch_size: int,
    device: str | torch.device,
    backend: Backend,
) -> dict[str, dict[str, np.ndarray]]:
    """``predict`` on every split, each rank on its share of the rows (engine/eval/shard.py: whole batches,
    so each image is classified in the batch it would be in alone), gathered in row order on every rank."""
    out = {}
    for name in splits(data):
        split: ImageSet = getattr(data, name)
        mine = share(len(split), batch_size, backend.rank, backend.world_size)
        rows = torch.tensor(mine.rows, dtype=torch.long)
        part = ImageSet(split.images[rows], split.labels[rows], [split.ids[i] for i in mine.rows])
        pred = predict(model, part, transform, batch_size, device)
        parts = backend.gather_object({k: v[: mine.real] for k, v in pred.items()})  # the stand-in dropped
        out[name] = {k: np.concatenate([q[k] for q in parts]) for k in pred}
    return out


def describe(metrics: dict) -> str:
    return registry.describe(metrics, "image_classification")


class ImageClassification(Task):
    name = suite = "image_classification"
    forward = staticmethod(classifier_logits)
    reference_target = None  # an image classifier's scores do not depend on a reference model's
    trained_on = {"original": "D (forget + retain)", "retrain": "D_r (retain only)"}
    headline = registry.headline("image_classification")

    def __init__(self, cfg, model_path: str | None):
        self.cfg = cfg
        self.model_path = model_path  # the model a run starts from (None: `train` builds model.arch)
        # `unlearn train`: the Original on D = D_r + D_f, and Retrain on D_r alone (exact unlearning)
        self.train_targets = train_targets(cfg)
        self.data, self.image, self.transform = load_data_and_transform(cfg, model_path)
        d = self.data
        self.description = (
            f"forget set: {d.description}: {len(d.forget)} examples; retain {len(d.retain)}, "
            f"val {len(d.val)}, test {len(d.test)}"
        )

    def forget_summary(self) -> dict:
        return self.data.forget_summary()

    def streams(self, augment: bool = False, folder=None, backend=None) -> dict:
        """The forget and retain streams (images are decoded per batch: nothing to tokenize into ``folder``)."""
        return {
            "forget": ImageStream(self.data.forget, self.transform, augment=augment),
            "retain": ImageStream(self.data.retain, self.transform, augment=augment),
        }

    def train_stream(self, target: str) -> ImageStream:
        rows = self.data.train if target == "original" else self.data.retain
        return ImageStream(rows, self.transform, augment=self.cfg.train.augment)

    def load(self, path: str, revision: str | None = None, trust_remote_code: bool = False):
        return load_classifier(
            path, self.data.num_labels, revision, trust_remote_code, config_key(self.cfg, path)
        )

    def build(self):
        """A from-scratch model (``model.arch``) or, without one, ``model.path`` to fine-tune."""
        m = self.cfg.model
        if m.arch:
            return build_classifier(m.arch, self.data.num_labels, m.width, self.data.class_names)
        return self.load(m.path, m.revision, m.trust_remote_code)

    def evaluate(self, model, device, reference=None, cache_dir=None, backend=None) -> dict:
        """Errors and membership attacks of ``model`` (or of what the function ``model`` loads). With a
        ``backend`` of several ranks each classifies its share of every split and all compute the numbers
        from the gathered predictions, as one process would."""
        if not isinstance(model, torch.nn.Module):
            model = model()
        c = self.cfg.eval
        model = model.to(device)
        if not is_shared(backend):
            return evaluate(
                model, self.data, self.transform, c.batch_size, device, attacks=True, seed=c.mia_seed
            )
        shared = shared_predictions(model, self.data, self.transform, c.batch_size, device, backend)
        return evaluate(model, self.data, self.transform, c.batch_size, device, attacks=True, seed=c.mia_seed,
                        predictions=shared)  # fmt: skip

    def history_row(self, model, device, epoch: int, lr, losses: dict, metrics: dict | None = None) -> dict:
        """One row of the per-epoch history (errors without the attacks; ``metrics`` already computed for
        this model are reused)."""
        t = time.perf_counter()
        if metrics is None:
            c = self.cfg.eval
            metrics = evaluate(model, self.data, self.transform, c.batch_size, device, attacks=False,
                               seed=c.mia_seed)  # fmt: skip
        row = {
            "epoch": epoch,
            "lr": lr,
            **metrics,
            "max_loss": losses.get("max"),
            "min_loss": losses.get("min"),
        }
        row["eval_seconds"] = time.perf_counter() - t
        return row

    def rewind_series(self, history: list[dict], final: dict) -> tuple[list[float], float, dict]:
        """SCRUB+R: the forget error per epoch and its target, the final model's error on the forget-class
        validation examples (same classes, never trained on); and how the report names them. (Under
        ``method.schedule=calibrated`` the recipe aims at the schedule's frozen target instead.)"""
        series = [r["forget_error"] for r in history]
        target = final["forget_val_error"]
        return series, target, {"target_error": target, "forget_errors": series}

    calibration_measure = "error (%)"  # what the calibrated schedule steers, for its log

    def calibration(self, row: dict) -> tuple[float, float]:
        """SCRUB's calibrated schedule: (forget error, what unseen data of its classes shows) from a history
        row (percent); the schedule freezes the second at epoch 0."""
        return row["forget_error"], row["forget_target_error"]

    def forget_error(self, model, device) -> float:
        """The forget error (percent, eval mode) alone: the calibrated schedule's check inside a max phase.
        Every rank classifies the whole forget set (under ZeRO-3 each forward is collective)."""
        c = self.cfg.eval
        return error_percent(predict(model, self.data.forget, self.transform, c.batch_size, device))

    def save(self, model, path, title: str, settings: dict, metrics: dict, weights=None, record=None,
             forget: bool = True) -> None:  # fmt: skip
        summary = self.forget_summary()
        card = run_card(self.cfg, path, self.model_path, title, summary if forget else None, settings,
                        {k: metrics[k] for k in self.headline if k in metrics}, "Metrics (errors and attacks in percent)",
                        task_type="image-classification", sources=[self.cfg.data.dataset],
                        target=(record or {}).get("target"))  # fmt: skip
        record = {"forget": summary, "method": settings, "base_model": self.model_path, "metrics": metrics,
                  **(record or {})}  # fmt: skip
        save_checkpoint(model, path, image_processor(self.image), card, record, state_dict=weights)

    describe = staticmethod(describe)

    def method_context(self, backend) -> MethodContext:
        retain = ImageStream(self.data.retain, self.transform, augment=False)

        def retain_batches(batch_size: int):
            for rows in torch.arange(len(retain)).split(batch_size):
                yield retain.get(rows)

        d = self.data
        return MethodContext(
            forward=classifier_logits,
            retain_batches=retain_batches,
            freeze=backend.prepare_frozen,
            device=backend.device,
            forget_classes=list(d.forget_classes) if d.forget_kind == "class" else None,
        )

    def row_ids(self, stream: str) -> list | None:
        part = {"forget": self.data.forget, "retain": self.data.retain}.get(stream)
        return None if part is None else list(part.ids)
