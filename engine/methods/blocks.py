"""A network's "blocks", for the last-k baselines (CF-k, EU-k), Fisher's head, and re-initialisation.

Blocks are the model's child modules in registration order (which is the forward order of the engine's
networks), with ``nn.Sequential`` / ``nn.ModuleList`` children flattened ONE level, keeping only modules
that hold parameters. A ResNet stage thus contributes its residual blocks, All-CNN's ``features``
its conv-BN-ReLU units, and the classifier head is the last block:

- ``PreActResNetForImageClassification`` (11): conv1, bn1, layer1.0, layer1.1, ..., layer4.0, layer4.1, linear
- ``AllCNNForImageClassification`` (9): features.0, .1, .2, .4, .5, .6, .8, .9 (dropout slots and the pooling
  hold no parameters), classifier.0

so k=2 is "the last residual block (ResNet) / last conv unit (All-CNN) + the head".
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import ConfigError


class BlocksError(ConfigError, ValueError):
    """k does not fit the model's blocks (a ValueError, printed by the CLI without a traceback)."""


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every block, in order (see the module docstring)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            out += [(f"{name}.{k}", grandchild) for k, grandchild in child.named_children()]
        else:
            out.append((name, child))
    return [(n, m) for n, m in out if next(m.parameters(), None) is not None]


def last_blocks(model: nn.Module, k: int) -> list[tuple[str, nn.Module]]:
    blocks = model_blocks(model)
    if not 1 <= k <= len(blocks):
        names = ", ".join(n for n, _ in blocks)
        raise BlocksError(
            f"k={k} but {type(model).__name__} has {len(blocks)} blocks ({names}); use 1 <= method.k <= {len(blocks)}"
        )
    return blocks[-k:]


def head_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of the head's (the last block's) parameters."""
    name, head = model_blocks(model)[-1]
    return {f"{name}.{n}" for n, _ in head.named_parameters()}


def fresh_model(model: nn.Module) -> nn.Module:
    """A freshly initialised model of the same class and config (its own init, drawn from torch's RNG)."""
    return type(model)(model.config)


def _keep_eval(module: nn.Module, args) -> None:
    module.eval()


def freeze_all_but_last(model: nn.Module, k: int) -> list[tuple[str, nn.Module]]:
    """Freeze every block but the last k (and any parameter outside the blocks) and return the last k.

    Frozen means fixed function: no gradients (so the backend leaves them out of the optimizer) AND
    eval-mode BatchNorm/dropout, kept by a forward pre-hook because the loop puts the whole student in
    train mode each phase; otherwise the frozen blocks' running statistics would drift towards D_r.
    """
    trained = last_blocks(model, k)
    model.requires_grad_(False)
    keep = {id(m) for _, m in trained}
    for _, block in model_blocks(model):
        if id(block) in keep:
            block.requires_grad_(True)
        else:
            block.register_forward_pre_hook(_keep_eval)
    return trained


@torch.no_grad()
def reinitialise(model: nn.Module, blocks: list[tuple[str, nn.Module]] | None = None) -> None:
    """Load a fresh model's weights (and buffers: BatchNorm running statistics) into ``blocks`` of
    ``model`` (all of it when None)."""
    fresh = fresh_model(model)
    if blocks is None:
        model.load_state_dict(fresh.state_dict())
        return
    for name, block in blocks:
        block.load_state_dict(fresh.get_submodule(name).state_dict())
