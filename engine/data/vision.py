"""Image-classification data through Hugging Face ``datasets``: loading, column detection, the
per-class validation hold-out, forget/retain resolution with stable ids, and batches as tensors.

Images are decoded once into a uint8 tensor (CIFAR-scale data fits in memory many times over) so
that every epoch is pure tensor indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.selection import ids_sha256, requested_ids
from engine.data.sources import load_splits
from engine.errors import DataError

# ----------------------------------------------------------------------------- columns


def detect_columns(ds, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image column (an ``Image`` feature) and the label column (a ``ClassLabel``), unless given."""
    import datasets

    feats = ds.features
    cols = list(feats)
    if image_column is None:
        found = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        found = found or [c for c in ("img", "image", "pixel_values") if c in feats]
        if not found:
            raise DataError(f"no image column found among {cols}; set data.image_column")
        image_column = found[0]
    if label_column is None:
        found = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
        found = found or [c for c in ("label", "labels", "fine_label") if c in feats]
        if not found:
            raise DataError(f"no label column found among {cols}; set data.label_column")
        label_column = found[0]
    for key, c in (("data.image_column", image_column), ("data.label_column", label_column)):
        if c not in feats:
            raise DataError(
                f"{key}={c!r} is not a column of the dataset (its columns are {cols}): set {key} to one of them"
            )
    return image_column, label_column


def _class_names(ds, label_column: str) -> list[str] | None:
    import datasets

    f = ds.features[label_column]
    return list(f.names) if isinstance(f, datasets.ClassLabel) else None


def _decode(ds, rows: np.ndarray, image_column: str, image_size: int | None) -> torch.Tensor:
    """Decode the selected rows into a uint8 tensor (N, C, H, W)."""
    sub = ds.select(rows.tolist())
    out = []
    for img in sub[image_column]:
        if image_size is not None:
            img = img.resize((image_size, image_size))
        arr = np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy for torch
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    if not out:
        return torch.zeros(0, 3, image_size or 32, image_size or 32, dtype=torch.uint8)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise DataError(
            f"images have different sizes {sorted(shapes)[:3]}...; set data.image_size to resize them"
        )
    return torch.stack(out)


# ----------------------------------------------------------------------------- sets


@dataclass
class ImageSet:
    """Examples as tensors: images uint8 (N, C, H, W), labels int64 (N,), and stable ids."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: list

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray | torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(np.flatnonzero(np.asarray(mask)), dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], [self.ids[i] for i in idx.tolist()])

    def concat(self, other: ImageSet) -> ImageSet:
        return ImageSet(
            torch.cat([self.images, other.images]),
            torch.cat([self.labels, other.labels]),
            self.ids + other.ids,
        )


@dataclass
class UnlearningData:
    """Everything a run needs: D_f, D_r, the validation hold-out, its forget-class part (SCRUB+R's
    target), the test set, and a description of how the forget set was chosen."""

    forget: ImageSet
    retain: ImageSet
    val: ImageSet
    forget_val: ImageSet
    test: ImageSet
    class_names: list[str]
    forget_classes: list[int]
    forget_kind: str
    description: str
    extra: dict = field(default_factory=dict)
    # every example forgotten up to this version (forget.earlier_ids in the data + this forget set): the set a
    # stream of deletion requests is audited on; None without earlier ids
    forgotten: ImageSet | None = None

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> ImageSet:
        """D = D_r + D_f: what the Original is trained on."""
        return self.retain.concat(self.forget)

    def forget_summary(self) -> dict:
        return {
            "kind": self.forget_kind,
            "description": self.description,
            "size": len(self.forget),
            "ids_sha256": ids_sha256(self.forget.ids),
            "classes": [self.class_names[c] for c in self.forget_classes],
            **({"retain_ids_sha256": ids_sha256(self.retain.ids)} if self.extra.get("retain_by_id") else {}),
        }


def _rows_by_class(labels: np.ndarray, classes: list[int], limit: int | None) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c)[:limit] for c in classes]


def _resolve_label(label, class_names: list[str]) -> int:
    if label is None:
        raise DataError("this forget kind needs forget.label (a class index or name)")
    if isinstance(label, str) and not label.lstrip("-").isdigit():
        if label not in class_names:
            raise DataError(f"unknown class {label!r}; the classes are {class_names}")
        return class_names.index(label)
    idx = int(label)
    if not 0 <= idx < len(class_names):
        raise DataError(
            f"unknown class index {idx}; valid indices are 0..{len(class_names) - 1} ({class_names})"
        )
    return idx


def _positions(requested: list, train: ImageSet, what: str) -> list[int]:
    """Rows of ``requested`` in ``train``, refused when some are not there."""
    position = {v: k for k, v in enumerate(train.ids)}
    missing = [i for i in requested if i not in position]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(requested)} {what} ids are not in the training data (after the validation "
            f"hold-out and data.classes / max_per_class filters), e.g. {missing[:5]}; check the ids and the data section"
        )
    return [position[i] for i in requested]


def select_forget(train: ImageSet, class_names: list[str], fcfg) -> tuple[np.ndarray, list[int], str]:
    """Boolean mask of the forget rows in ``train``, the classes involved, and a description."""
    labels = train.labels.numpy()
    n = len(train)
    if fcfg.kind == "class":
        c = _resolve_label(fcfg.label, class_names)
        mask = labels == c
        return mask, [c], f"every training example of class {c} ({class_names[c]})"
    if fcfg.kind == "selective":
        c = _resolve_label(fcfg.label, class_names)
        if fcfg.count is None:
            raise DataError("forget.kind=selective needs forget.count (how many examples of the class)")
        rows = np.flatnonzero(labels == c)
        if fcfg.count > len(rows):
            raise DataError(
                f"forget.count={fcfg.count} but class {class_names[c]!r} has only {len(rows)} training examples"
            )
        pick = np.random.default_rng(fcfg.seed).choice(rows, size=fcfg.count, replace=False)
        mask = np.zeros(n, dtype=bool)
        mask[pick] = True
        return (
            mask,
            [c],
            f"{fcfg.count} random training examples of class {c} ({class_names[c]}), seed {fcfg.seed}",
        )
    if fcfg.kind == "random":
        if fcfg.fraction is None:
            raise DataError("forget.kind=random needs forget.fraction (e.g. 0.1)")
        k = int(round(fcfg.fraction * n))
        pick = np.random.default_rng(fcfg.seed).choice(n, size=k, replace=False)
        mask = np.zeros(n, dtype=bool)
        mask[pick] = True
        classes = sorted(set(labels[pick].tolist()))
        return (
            mask,
            classes,
            f"a random {fcfg.fraction:.1%} of the training set ({k} examples), seed {fcfg.seed}",
        )
    # kind == "ids"
    requested = requested_ids(fcfg.ids, fcfg.ids_file, "forget")
    if not requested:
        raise DataError("forget.kind=ids needs forget.ids or forget.ids_file")
    mask = np.zeros(n, dtype=bool)
    mask[_positions(requested, train, "forget")] = True
    classes = sorted(set(labels[mask].tolist()))
    return mask, classes, f"{len(requested)} examples given by id"


def select_retain(train: ImageSet, forget_mask: np.ndarray, fcfg) -> np.ndarray:
    """Boolean mask of the retain rows: exactly ``forget.retain_ids`` / ``retain_ids_file`` when given,
    else every training row not forgotten."""
    if fcfg.retain_ids is None and fcfg.retain_ids_file is None:
        return ~forget_mask
    if fcfg.kind != "ids":  # the config refuses this too; kept for configs built without validation
        raise DataError("forget.retain_ids needs forget.kind=ids; drop the retain ids or list the forget ids")
    requested = requested_ids(fcfg.retain_ids, fcfg.retain_ids_file, "retain")
    if not requested:
        raise DataError(
            "forget.retain_ids is empty: list the examples to retain, or unset it to retain every example not forgotten"
        )
    rows = _positions(requested, train, "retain")
    overlap = [train.ids[r] for r in rows if forget_mask[r]]
    if overlap:
        raise DataError(
            f"{len(overlap)} ids are in both the forget and the retain set, e.g. {overlap[:5]}; "
            "an example is either forgotten or retained: remove them from one of the lists"
        )
    mask = np.zeros(len(train), dtype=bool)
    mask[rows] = True
    return mask


def prepare_data(dcfg, fcfg) -> UnlearningData:
    """Load, filter, hold out validation, and split train into forget and retain (all with stable ids)."""
    splits = load_splits(dcfg.dataset, [dcfg.train_split, dcfg.test_split])
    for s in (dcfg.train_split, dcfg.test_split):
        if s not in splits:
            raise DataError(f"split {s!r} not found in {dcfg.dataset!r}; it has {sorted(splits)}")
    train_ds, test_ds = splits[dcfg.train_split], splits[dcfg.test_split]
    image_col, label_col = detect_columns(train_ds, dcfg.image_column, dcfg.label_column)
    all_names = _class_names(train_ds, label_col)
    train_labels = np.asarray(train_ds[label_col])
    n_all = int(train_labels.max()) + 1 if all_names is None else len(all_names)
    classes = dcfg.classes if dcfg.classes is not None else list(range(n_all))
    bad = [c for c in classes if not 0 <= c < n_all]
    if bad:
        raise DataError(
            f"data.classes has unknown label indices {bad}; the dataset has labels 0..{n_all - 1}"
        )
    class_names = [all_names[c] if all_names else str(c) for c in classes]
    remap = {c: k for k, c in enumerate(classes)}

    def take(ds, labels, limit, id_col) -> ImageSet:
        rows = np.sort(np.concatenate(_rows_by_class(labels, classes, limit)))
        images = _decode(ds, rows, image_col, dcfg.image_size)
        ys = torch.tensor([remap[int(v)] for v in labels[rows]], dtype=torch.long)
        ids = list(np.asarray(ds[id_col])[rows].tolist()) if id_col else rows.tolist()
        return ImageSet(images, ys, ids)

    if dcfg.id_column and dcfg.id_column not in train_ds.features:
        raise DataError(
            f"data.id_column {dcfg.id_column!r} is not a column of the train split ({list(train_ds.features)})"
        )
    full_train = take(train_ds, train_labels, dcfg.max_per_class, dcfg.id_column)
    test = take(test_ds, np.asarray(test_ds[label_col]), dcfg.max_test_per_class, None)
    if len(set(full_train.ids)) != len(full_train.ids):
        raise DataError(
            f"data.id_column {dcfg.id_column!r} has duplicate values; ids must be unique per example"
        )

    # Per-class validation hold-out (20% by default, as the paper): never trained on, never forgotten.
    rng = np.random.default_rng(dcfg.split_seed)
    is_val = np.zeros(len(full_train), dtype=bool)
    y = full_train.labels.numpy()
    for c in range(len(classes)):
        rows = np.flatnonzero(y == c)
        k = int(round(dcfg.val_fraction * len(rows)))
        is_val[rng.permutation(rows)[:k]] = True
    val, train = full_train.subset(is_val), full_train.subset(~is_val)

    if fcfg.kind == "ids":
        val_ids = set(val.ids)
        for what, ids, ids_file in (
            ("forget", fcfg.ids, fcfg.ids_file),
            ("retain", fcfg.retain_ids, fcfg.retain_ids_file),
        ):
            held = [i for i in requested_ids(ids, ids_file, what) if i in val_ids]
            if held:
                raise DataError(
                    f"{len(held)} {what} ids are in the validation hold-out (never trained on), e.g. {held[:5]}; "
                    "drop them or set data.val_fraction=0"
                )
    earlier_rows = None
    if (
        getattr(fcfg, "earlier_ids", None) is not None
    ):  # forgotten by earlier versions: never trained on again
        earlier = set(fcfg.earlier_ids)
        is_earlier = np.array([i in earlier for i in train.ids], dtype=bool)
        earlier_rows, train = train.subset(is_earlier), train.subset(~is_earlier)
    mask, forget_classes, description = select_forget(train, class_names, fcfg)
    retain_mask = select_retain(train, mask, fcfg)
    if fcfg.retain_ids is not None or fcfg.retain_ids_file is not None:
        description += f"; {int(retain_mask.sum())} retained examples given by id"
    forget, retain = train.subset(mask), train.subset(retain_mask)
    if len(forget) == 0:
        raise DataError(f"the forget set is empty ({description}); check the forget section")
    if len(retain) == 0:
        raise DataError("the retain set is empty: the forget set covers the whole training data")
    forget_val = val.subset(np.isin(val.labels.numpy(), forget_classes))
    return UnlearningData(
        forget=forget,
        retain=retain,
        val=val,
        forget_val=forget_val,
        test=test,
        class_names=class_names,
        forget_classes=forget_classes,
        forget_kind=fcfg.kind,
        description=description,
        extra={"retain_by_id": fcfg.retain_ids is not None or fcfg.retain_ids_file is not None},
        forgotten=None if earlier_rows is None else earlier_rows.concat(forget),
    )


# ----------------------------------------------------------------------------- batches


class ImageTransform:
    """uint8 (N, C, H, W) -> normalised float, optionally resized, optionally augmented (random
    crop with 4-pixel padding + horizontal flip, drawn from a given generator so it is reproducible)."""

    def __init__(self, mean: list[float], std: list[float], size: int | None = None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.size = size

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if generator is not None:
            x = _augment(x, generator)
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def _augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):  # per-example crop offsets; n is a batch, so a Python loop is cheap enough
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


class ImageStream:
    """A stream the loop draws batches from: ``get(rows, seed)`` returns a batch dict on the CPU."""

    def __init__(self, data: ImageSet, transform: ImageTransform, augment: bool = False):
        self.data, self.transform, self.augment = data, transform, augment

    def __len__(self) -> int:
        return len(self.data)

    def get(self, rows: torch.Tensor, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed) if self.augment else None
        return {
            "pixel_values": self.transform(self.data.images[rows], g),
            "labels": self.data.labels[rows],
            "rows": rows,
        }

    def join(self, rows: torch.Tensor, other: ImageStream, other_rows: torch.Tensor, seed: int = 0) -> dict:
        """``rows`` of this stream then ``other_rows`` of ``other`` in one batch (engine/data/paired.py)."""
        a, b = self.get(rows, seed), other.get(other_rows, seed + 1)  # b: its own augmentation draws
        return {k: torch.cat([a[k], b[k]]) for k in ("pixel_values", "labels")}
