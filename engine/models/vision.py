"""The paper's CIFAR-scale networks (pre-activation ResNet-18 and All-CNN) as Hugging Face models.

Writing them as ``PreTrainedModel`` subclasses buys one checkpoint format for every model the engine
touches: ``save_pretrained`` writes ``config.json`` + ``model.safetensors`` (no pickle), and
``AutoModelForImageClassification.from_pretrained`` rebuilds the right class from the folder alone.

Architectures follow the SCRUB authors' code (meghdadk/SCRUB ``models.py``: ``ResNet18``/``_ResBlock``
and ``AllCNN``) rather than textbook versions, because the paper's numbers were produced with those
exact networks. Module names mirror theirs, so one of their ``state_dict`` files loads with
``load_state_dict`` unchanged. Where their code differs from the usual description, a comment says so.

Needs transformers >= 5: configs are dataclasses there, and ``_init_weights`` uses
``transformers.initialization`` so ``from_pretrained`` does not overwrite weights it just loaded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = [
    "AllCNNConfig",
    "AllCNNForImageClassification",
    "PreActResNetConfig",
    "PreActResNetForImageClassification",
    "VISION_ARCHS",
    "build_vision_model",
    "register_auto_classes",
]


def _scaled(base: int, width: float) -> int:
    """``base`` channels at ``width``, truncated as the authors' ``int(base * filters_percentage)``.

    Truncating, not rounding, is what makes width 0.4 their network (ResNet-18 stages 25/51/102/204, not
    26/51/102/205) and lets their x0.4 checkpoints load; widths where ``base * width`` is an integer
    (0.25, 0.5, 1) are the same either way.
    """
    # Only differs from theirs where int() gives 0: a layer with no channels is an error, not a tiny model.
    return max(1, int(base * width))


def _check_width(width: float) -> float:
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return float(width)


# --------------------------------------------------------------------------------------------------
# Configs. transformers 5 turns every PretrainedConfig subclass into a keyword-only dataclass, so the
# fields are declared as annotated class attributes (defaults must be immutable: tuples, not lists).
# --------------------------------------------------------------------------------------------------


class PreActResNetConfig(PretrainedConfig):
    """Config of :class:`PreActResNetForImageClassification` (``num_labels`` comes from the base class).

    ``width`` scales the stage widths 64/128/256/512 (the authors' ``filters_percentage``), truncated as
    their ``int(64*filters_percentage)`` etc. (x0.4: 25/51/102/204); the linear layer takes the last
    stage's width, and the stem stays at 64 channels as in their code. ``conv_bias`` reproduces their 3x3
    convs, which carry a bias because ``models.py`` redefines ``conv3x3`` with ``bias=True`` after the
    ResNet classes (the later definition is the one called at construction time).
    """

    model_type = "unlearn-preact-resnet"

    width: float = 1.0
    num_blocks: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    num_channels: int = 3
    conv_bias: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self.width = _check_width(self.width)
        # JSON has no tuples; a list keeps a loaded config equal to a freshly built one.
        self.num_blocks = [int(n) for n in self.num_blocks]
        if len(self.num_blocks) != 4 or min(self.num_blocks) < 1:
            raise ValueError(f"num_blocks must be 4 positive ints, got {self.num_blocks}")
        super().__post_init__(**kwargs)


class AllCNNConfig(PretrainedConfig):
    """Config of :class:`AllCNNForImageClassification` (``num_labels`` comes from the base class).

    ``width`` scales the 96/192 filter counts, truncated as the authors' ``int(96 * filters_percentage)``.
    ``dropout`` defaults to False because the authors' ``AllCNN`` does, and their training scripts never
    turn it on; set True for Springenberg's original.
    """

    model_type = "unlearn-allcnn"

    width: float = 1.0
    num_channels: int = 3
    dropout: bool = False
    batch_norm: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        self.width = _check_width(self.width)
        super().__post_init__(**kwargs)


# --------------------------------------------------------------------------------------------------
# Shared model plumbing.
# --------------------------------------------------------------------------------------------------


class _VisionPreTrainedModel(PreTrainedModel):
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own defaults (Kaiming-uniform, a=sqrt(5)) for conv and linear, since that is what the
        # authors' networks start from. The hf_init functions skip tensors flagged as already loaded,
        # which is what keeps from_pretrained from re-randomising a checkpoint it has just read.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                hf_init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            if module.weight is not None:
                hf_init.ones_(module.weight)
                hf_init.zeros_(module.bias)
            if module.running_mean is not None:
                hf_init.zeros_(module.running_mean)
                hf_init.ones_(module.running_var)
                hf_init.zeros_(module.num_batches_tracked)

    @staticmethod
    def _output(logits: torch.Tensor, labels: torch.Tensor | None) -> ImageClassifierOutput:
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


# --------------------------------------------------------------------------------------------------
# Pre-activation ResNet-18.
# --------------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, plus a shortcut (a 1x1 conv when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, conv_bias: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, bias=conv_bias)
        # Only built when the shape changes, so identity blocks hold no shortcut weights (as in the authors' code).
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input but the identity path the raw one, as in the authors'
        # (and Kuang Liu's) block; swapping them would change the function, not just the weights.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetForImageClassification(_VisionPreTrainedModel):
    """Pre-activation ResNet-18 for 32x32 inputs, as trained in the SCRUB paper.

    Stem: 3x3 conv (stride 1, 64 channels) -> BN -> ReLU; four stages of :class:`PreActBlock`; global
    average pool; linear. As in the authors' code there is no BN-ReLU after the last stage (the stem's
    BN-ReLU is where the "extra" normalisation sits instead).
    """

    config: PreActResNetConfig
    config_class = PreActResNetConfig
    base_model_prefix = "preact_resnet"
    _no_split_modules = ["PreActBlock"]

    def __init__(self, config: PreActResNetConfig) -> None:
        super().__init__(config)
        bias = config.conv_bias
        self.conv1 = _conv3x3(config.num_channels, 64, bias=bias)
        self.bn1 = nn.BatchNorm2d(64)
        self._in_planes = 64
        stage_widths = [_scaled(base, config.width) for base in (64, 128, 256, 512)]
        self.layer1 = self._make_layer(stage_widths[0], config.num_blocks[0], 1, bias)
        self.layer2 = self._make_layer(stage_widths[1], config.num_blocks[1], 2, bias)
        self.layer3 = self._make_layer(stage_widths[2], config.num_blocks[2], 2, bias)
        self.layer4 = self._make_layer(stage_widths[3], config.num_blocks[3], 2, bias)
        self.linear = nn.Linear(stage_widths[3] * PreActBlock.expansion, config.num_labels)
        self.post_init()

    def _make_layer(self, planes: int, num_blocks: int, stride: int, bias: bool) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self._in_planes, planes, s, conv_bias=bias))
            self._in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        out = F.relu(self.bn1(self.conv1(pixel_values)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Adaptive pooling equals the authors' avg_pool2d(4) at 32x32 and still works at other sizes.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self._output(self.linear(out), labels)


# --------------------------------------------------------------------------------------------------
# All-CNN.
# --------------------------------------------------------------------------------------------------


class _ConvBNReLU(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        batch_norm: bool = True,
    ) -> None:
        padding = (kernel_size - 1) // 2
        # A conv bias in front of BN is cancelled by BN's mean subtraction, hence bias only without BN.
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=not batch_norm
            )
        ]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class AllCNNForImageClassification(_VisionPreTrainedModel):
    """All-CNN (Springenberg et al. 2015) in the SCRUB authors' variant: BN after every conv, strided
    3x3 convs instead of pooling, global average pool, then a linear layer (not an all-conv head)."""

    config: AllCNNConfig
    config_class = AllCNNConfig
    base_model_prefix = "allcnn"
    _no_split_modules = ["_ConvBNReLU"]

    def __init__(self, config: AllCNNConfig) -> None:
        super().__init__(config)
        n1 = _scaled(96, config.width)
        n2 = _scaled(192, config.width)
        bn = config.batch_norm

        def drop() -> nn.Module:
            # Identity keeps the Sequential indices (and so the state_dict keys) the same either way.
            return nn.Dropout(p=0.5) if config.dropout else nn.Identity()

        self.features = nn.Sequential(
            _ConvBNReLU(config.num_channels, n1, 3, batch_norm=bn),
            _ConvBNReLU(n1, n1, 3, batch_norm=bn),
            _ConvBNReLU(n1, n2, 3, stride=2, batch_norm=bn),
            drop(),
            _ConvBNReLU(n2, n2, 3, batch_norm=bn),
            _ConvBNReLU(n2, n2, 3, batch_norm=bn),
            _ConvBNReLU(n2, n2, 3, stride=2, batch_norm=bn),
            drop(),
            _ConvBNReLU(n2, n2, 3, batch_norm=bn),
            _ConvBNReLU(n2, n2, 1, batch_norm=bn),
            # Equals the authors' AvgPool2d(8) at 32x32 input.
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(n2, config.num_labels))
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        return self._output(self.classifier(self.features(pixel_values)), labels)


# --------------------------------------------------------------------------------------------------
# Registration and construction.
# --------------------------------------------------------------------------------------------------

_PAIRS: tuple[tuple[type[PretrainedConfig], type[PreTrainedModel]], ...] = (
    (PreActResNetConfig, PreActResNetForImageClassification),
    (AllCNNConfig, AllCNNForImageClassification),
)

VISION_ARCHS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "preact_resnet18": (PreActResNetConfig, PreActResNetForImageClassification),
    "allcnn": (AllCNNConfig, AllCNNForImageClassification),
}


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageClassification`` resolve our ``model_type`` strings.

    Safe to call repeatedly: ``exist_ok=True`` lets a re-import (or a reloaded module with new class
    objects) overwrite the earlier entry instead of raising.
    """
    for config_cls, model_cls in _PAIRS:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, model_cls, exist_ok=True)


def build_vision_model(arch: str, num_labels: int, width: float = 1.0, **kwargs: Any) -> PreTrainedModel:
    """Build a freshly initialised model; ``kwargs`` go to the arch's config (e.g. ``dropout=True``)."""
    try:
        config_cls, model_cls = VISION_ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown vision arch {arch!r}; known: {sorted(VISION_ARCHS)}") from None
    return model_cls(config_cls(num_labels=num_labels, width=width, **kwargs))


# Loading a checkpoint through the Auto classes only needs this module imported.
register_auto_classes()
