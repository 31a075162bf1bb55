"""Training networks: the recipe's family builds it (`families/`), or a run's trained weights start it; one LR per
parameter group for layer-wise LR decay."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from torch import nn

from .architectures import load_exactly
from .families import get_family
from .lora import has_lora
from .recipes import Recipe


def create_model(recipe: Recipe, pretrained: bool | str | Path = True) -> nn.Module:
    """The recipe's network with a new 5-class head, built by its family (`families/`).

    `pretrained`: True downloads the published weights (timm / open_clip tag of the recipe), a path loads a
    local copy of a published file, False leaves the backbone randomly initialised (from scratch).
    """
    if recipe.init_from:
        model = create_model(recipe.override(init_from=''), pretrained=False)
        load_whole(model, recipe.init_from)
        return model
    return get_family(recipe.family).create(recipe, pretrained)


def load_whole(model: nn.Module, source: str | Path) -> None:
    """Every weight of `model`, head included, from a run folder's best weights or an exported file of the same
    network (strict: every key, every shape)."""
    from .distill import read_trained_weights
    state, path = read_trained_weights(Path(source))
    if has_lora(state):
        raise ValueError(f'{path} holds LoRA updates: export the run first (python export.py --run ...)')
    load_exactly(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(path))


def layerwise_lrs(n_groups: int, head_lr: float, top_lr: float, decay: float) -> np.ndarray:
    """One LR per parameter group: `head_lr` for the head (last group), `top_lr` for the top backbone group,
    multiplied by `decay` for each group further down."""
    return np.array([top_lr * decay ** (n_groups - 2 - i) for i in range(n_groups - 1)] + [head_lr])

