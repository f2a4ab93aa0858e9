"""The CIFAR networks as Hugging Face models: sizes, outputs, and a lossless safetensors round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageClassification

from engine.models.vision import (
    AllCNNConfig,
    AllCNNForImageClassification,
    PreActResNetConfig,
    PreActResNetForImageClassification,
    build_vision_model,
    register_auto_classes,
)

torch.set_num_threads(1)

# Measured once and pinned: a change here means the architecture drifted from the authors' networks.
PREACT_RESNET18_PARAMS_10 = 11_175_178
ALLCNN_PARAMS_10 = 1_620_010


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet() -> PreActResNetForImageClassification:
    torch.manual_seed(0)
    return build_vision_model("preact_resnet18", num_labels=10)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _round_trip(model: torch.nn.Module, path: Path):
    """Save, reload through the Auto class, and return (reloaded model, warnings logged by transformers)."""
    model.save_pretrained(path)
    # transformers' root logger does not propagate to Python's root, so listen on it directly.
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        loaded, info = AutoModelForImageClassification.from_pretrained(path, output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return loaded, handler.messages


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _assert_checkpoint_files(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))}


# ------------------------------------------------------------------------------- PreActResNet-18


def test_preact_resnet18_param_count(resnet: PreActResNetForImageClassification) -> None:
    n = _n_params(resnet)
    assert n == PREACT_RESNET18_PARAMS_10
    assert 11_100_000 <= n <= 11_300_000


def test_preact_resnet_width_shrinks_model(resnet: PreActResNetForImageClassification) -> None:
    small = build_vision_model("preact_resnet18", num_labels=10, width=0.25)
    assert _n_params(small) < _n_params(resnet) / 10
    assert small.linear.in_features == 128
    # Widths never truncate to zero channels.
    tiny = build_vision_model("preact_resnet18", num_labels=3, width=0.001)
    assert tiny.linear.in_features == 1
    assert tiny(_images()).logits.shape == (2, 3)


def test_preact_resnet_logits_shape(resnet: PreActResNetForImageClassification) -> None:
    resnet.eval()
    with torch.no_grad():
        out = resnet(_images(batch=3))
    assert out.logits.shape == (3, 10)
    assert out.loss is None


def test_preact_resnet_loss_is_cross_entropy(resnet: PreActResNetForImageClassification) -> None:
    resnet.eval()
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        out = resnet(_images(), labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels))


def test_preact_resnet_state_dict_keys_match_authors_code(resnet: PreActResNetForImageClassification) -> None:
    keys = set(resnet.state_dict())
    # Names from meghdadk/SCRUB models.py, so their checkpoints load with load_state_dict.
    for key in (
        "conv1.bias",
        "bn1.running_mean",
        "layer1.0.conv1.bias",
        "layer2.0.shortcut.0.weight",
        "linear.weight",
    ):
        assert key in keys
    assert "layer1.0.shortcut.0.weight" not in keys  # identity shortcut when the shape is unchanged


# The authors' state dicts, shape by shape, written out from meghdadk/SCRUB models.py independently of the
# engine's code: ResNet18 builds stage i with int(base * filters_percentage) channels, base 64/128/256/512,
# a 64-channel stem, conv3x3 with bias=True (the later definition in the file wins), a 1x1 shortcut only
# where the shape changes, and Linear(int(512 * filters_percentage), num_classes).


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def _authors_preact_resnet18_shapes(width: float, num_classes: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3), "conv1.bias": (64,)}
    shapes |= _bn_shapes("bn1", 64)
    in_planes = 64
    for stage, (base, first_stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        planes = int(base * width)  # the authors' int(64*filters_percentage) etc.
        for block, stride in enumerate((first_stride, 1)):
            p = f"layer{stage}.{block}"
            shapes |= _bn_shapes(f"{p}.bn1", in_planes)
            shapes[f"{p}.conv1.weight"] = (planes, in_planes, 3, 3)
            shapes[f"{p}.conv1.bias"] = (planes,)
            shapes |= _bn_shapes(f"{p}.bn2", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{p}.conv2.bias"] = (planes,)
            if stride != 1 or in_planes != planes:
                shapes[f"{p}.shortcut.0.weight"] = (planes, in_planes, 1, 1)
            in_planes = planes
    shapes["linear.weight"] = (num_classes, int(512 * width))
    shapes["linear.bias"] = (num_classes,)
    return shapes


def _authors_allcnn_shapes(width: float, num_classes: int) -> dict[str, tuple[int, ...]]:
    # AllCNN: n_filter1 = int(96 * filters_percentage), n_filter2 = int(192 * ...); each Conv is
    # Sequential(conv without bias, BN, ReLU); features 3 and 7 are Identity, 10 and 11 pool and flatten.
    n1, n2 = int(96 * width), int(192 * width)
    convs = {0: (n1, 3, 3), 1: (n1, n1, 3), 2: (n2, n1, 3), 4: (n2, n2, 3), 5: (n2, n2, 3), 6: (n2, n2, 3)}
    convs |= {8: (n2, n2, 3), 9: (n2, n2, 1)}
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (out_c, in_c, k) in convs.items():
        shapes[f"features.{i}.0.weight"] = (out_c, in_c, k, k)
        shapes |= _bn_shapes(f"features.{i}.1", out_c)
    shapes["classifier.0.weight"] = (num_classes, n2)
    shapes["classifier.0.bias"] = (num_classes,)
    return shapes


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.rand(shape, generator=g) + 0.5
        for key, shape in shapes.items()
    }


@pytest.mark.parametrize("width", [0.25, 0.4, 1.0])
def test_preact_resnet_loads_authors_state_dict_strictly(width: float) -> None:
    authors = _random_state_dict(_authors_preact_resnet18_shapes(width, num_classes=5))
    model = build_vision_model("preact_resnet18", num_labels=5, width=width)
    model.load_state_dict(authors, strict=True)  # raises on a missing/unexpected key or any shape mismatch
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in authors.items())
    model.eval()
    with torch.no_grad():
        assert model(_images()).logits.shape == (2, 5)


def test_preact_resnet_stage_widths_are_the_authors() -> None:
    def stages(width: float) -> list[int]:
        model = build_vision_model("preact_resnet18", num_labels=10, width=width)
        return [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] + [
            model.linear.in_features
        ]

    # x0.4 truncates as the authors' int(); rounding gave 26/51/102/205 (issue 21).
    assert stages(0.4) == [25, 51, 102, 204, 204]
    # x0.25 and x1 are exact products, so their shapes (and checkpoints and figures) are unchanged.
    assert stages(0.25) == [16, 32, 64, 128, 128]
    assert stages(1.0) == [64, 128, 256, 512, 512]


def test_preact_resnet_round_trip(resnet: PreActResNetForImageClassification, tmp_path: Path) -> None:
    # Non-default BN statistics make the test sensitive to buffers being saved and restored too.
    resnet.train()
    with torch.no_grad():
        resnet(_images(batch=4, seed=1))
    resnet.eval()

    loaded, warnings = _round_trip(resnet, tmp_path)
    assert type(loaded) is PreActResNetForImageClassification
    assert not warnings, warnings
    _assert_checkpoint_files(tmp_path)
    _assert_same_weights(resnet, loaded)
    assert loaded.config.num_labels == 10 and loaded.config.num_blocks == [2, 2, 2, 2]

    loaded.eval()
    x = _images(batch=2, seed=2)
    with torch.no_grad():
        assert torch.equal(resnet(x).logits, loaded(x).logits)


# ------------------------------------------------------------------------------- All-CNN


def test_allcnn_param_count_and_width() -> None:
    model = build_vision_model("allcnn", num_labels=10)
    assert _n_params(model) == ALLCNN_PARAMS_10
    assert _n_params(build_vision_model("allcnn", num_labels=10, width=0.25)) < ALLCNN_PARAMS_10 / 10
    # Without BN the convs carry their own bias (as in the authors' allcnn_no_bn).
    no_bn = build_vision_model("allcnn", num_labels=10, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in no_bn.modules())
    assert no_bn.features[0][0].bias is not None


@pytest.mark.parametrize("width", [0.25, 0.4, 1.0])
def test_allcnn_loads_authors_state_dict_strictly(width: float) -> None:
    authors = _random_state_dict(_authors_allcnn_shapes(width, num_classes=5))
    model = build_vision_model("allcnn", num_labels=5, width=width)
    model.load_state_dict(authors, strict=True)
    model.eval()
    with torch.no_grad():
        assert model(_images()).logits.shape == (2, 5)
    if width == 0.4:  # int(96 * 0.4), int(192 * 0.4); rounding gave 38/77
        assert (model.features[0][0].out_channels, model.classifier[0].in_features) == (38, 76)


def test_allcnn_dropout_flag_keeps_state_dict_keys() -> None:
    plain = build_vision_model("allcnn", num_labels=10)
    dropped = build_vision_model("allcnn", num_labels=10, dropout=True)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.Dropout) for m in dropped.modules()) == 2
    assert plain.state_dict().keys() == dropped.state_dict().keys()


def test_allcnn_round_trip_and_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_vision_model("allcnn", num_labels=7, width=0.5)
    model.train()
    with torch.no_grad():
        model(_images(batch=4, seed=1))
    model.eval()

    loaded, warnings = _round_trip(model, tmp_path)
    assert type(loaded) is AllCNNForImageClassification
    assert not warnings, warnings
    _assert_checkpoint_files(tmp_path)
    _assert_same_weights(model, loaded)
    assert loaded.config.width == 0.5

    loaded.eval()
    x, labels = _images(batch=3, seed=2), torch.tensor([0, 6, 2])
    with torch.no_grad():
        a, b = model(x, labels=labels), loaded(x, labels=labels)
    assert a.logits.shape == (3, 7)
    assert torch.equal(a.logits, b.logits)
    assert torch.allclose(a.loss, F.cross_entropy(a.logits, labels))


# ------------------------------------------------------------------------------- registry and builder


def test_auto_classes_resolve_and_registration_is_idempotent() -> None:
    register_auto_classes()
    register_auto_classes()
    cfg = AutoConfig.for_model("unlearn-preact-resnet", num_labels=4, width=0.25)
    assert isinstance(cfg, PreActResNetConfig)
    assert isinstance(AutoModelForImageClassification.from_config(cfg), PreActResNetForImageClassification)
    cfg = AutoConfig.for_model("unlearn-allcnn", num_labels=4)
    assert isinstance(cfg, AllCNNConfig) and cfg.dropout is False and cfg.batch_norm is True
    assert isinstance(AutoModelForImageClassification.from_config(cfg), AllCNNForImageClassification)


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(ValueError, match="allcnn.*preact_resnet18"):
        build_vision_model("vgg16", num_labels=10)


def test_invalid_config_values_rejected() -> None:
    with pytest.raises(ValueError, match="width"):
        PreActResNetConfig(width=0)
    with pytest.raises(ValueError, match="num_blocks"):
        PreActResNetConfig(num_blocks=[2, 2, 2])
