"""What an entry of the family registry holds (`flowers_fastai/families/__init__.py` lists the entries)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ..delivery import Delivery, StateDict
from ..preprocess import Preprocessing
from ..recipes import Recipe
from ..run_config import RunConfig


@dataclass(frozen=True)
class Family:
    name: str                                           # train.py's positional argument
    recipe: Recipe                                      # the brief's defaults
    # (recipe, pretrained: True = download / a path = local published file / False = random) -> network
    create: Callable[[Recipe, object], nn.Module]
    splitter: Callable[[nn.Module], list[list[nn.Parameter]]]   # parameter groups, bottom to top, head last
    # (arch, weight tag, size) -> the input pipeline of those weights at that size
    preprocessing: Callable[[str, str, int], Preprocessing]
    # (a run's RunConfig, its weights) -> the run's network with them loaded, every key checked
    trained_network: Callable[[RunConfig, StateDict, str], nn.Module]
    # (the trained network) -> RunConfig fields it needs to be rebuilt (e.g. the ViT's tower shape, `clip_spec`)
    network_config: Callable[[nn.Module], dict] = field(default=lambda model: {})
    delivery: Delivery | None = None                    # how it ships; None: not delivered (a teacher)


def with_published_weights(model: nn.Module, pretrained, published_file: Callable[[], Path],
                           load: Callable[[nn.Module, Path], None]) -> nn.Module:
    """`model` with the published weights loaded by `load` (a strict, every-key loader) when `pretrained` is True
    (`published_file()` downloads them, or finds them in the cache) or a local file; as built when it is False."""
    if pretrained is True:
        pretrained = published_file()
    if pretrained:
        load(model, pretrained)
    return model
