"""The registry of model families: one entry per family, one file per entry (`cnn.py`, `vit.py`, `teacher.py`).

A family owns everything that differs between models: its seed recipe, how its training network is built with
published weights (downloaded when online, a local file offline, every key checked), its parameter groups for
freezing and layer-wise LR decay, its preprocessing (resolved from the architecture and the weight tag), how a
run's weights are rebuilt (export, teachers), and, for the families that are delivered, the network `submit`
builds, the file name, the loader and the key that holds the head. Training, export, `submit` and distillation
look the family up here instead of branching on its name: adding a family is adding one entry.

No fastai and no timm / open_clip at import time: `submit` reads the registry, and its cold start must not pay
for them (each family imports them inside the functions that need them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..preprocess import Preprocessing
from ..recipes import Recipe

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Delivery:
    """How a family is delivered as a raw state_dict that `submit` loads without fastai."""
    weights_file: str                                   # default file name under weights/
    loader: str                                         # the `submit` function that loads it
    head_key: str                                       # the head's weight: 5 rows, one per class
    owns: Callable[[StateDict], bool]                   # whether a state_dict's key names are this family's
    # (state_dict, sidecar, path) -> (the delivery network built on the meta device with the file's tensors
    # assigned, its preprocessing); ValueError naming the file for tensors or a sidecar that do not fit
    build: Callable[[StateDict, dict, Path], tuple[nn.Module, Preprocessing]]
    # (config.json of a run, the trained network) -> the sidecar fields only this family writes
    sidecar: Callable[[dict, nn.Module], dict]
    # (state_dict, sidecar) -> what a run's config.json says of the network (`Family.trained_network` reads it)
    run_config: Callable[[StateDict, dict], dict]


@dataclass(frozen=True)
class Family:
    name: str                                           # train.py's positional argument
    title: str                                          # 'a ConvNeXt V2 CNN', for messages
    recipe: Recipe                                      # the seed's defaults
    # (recipe, pretrained: True = download / a path = local published file / False = random) -> network
    create: Callable[[Recipe, object], nn.Module]
    splitter: Callable[[nn.Module], list[list[nn.Parameter]]]   # parameter groups, bottom to top, head last
    # (arch, weight tag, size) -> the input pipeline of those weights at that size
    preprocessing: Callable[[str, str, int], Preprocessing]
    # (config.json of a run, its weights) -> the run's network with them loaded, every key checked
    trained_network: Callable[[dict, StateDict, str], nn.Module]
    run_config: Callable[[nn.Module], dict] = field(default=lambda model: {})   # extra config.json fields
    delivery: Delivery | None = None


def sidecar_preprocessing(sidecar: dict, default: Preprocessing) -> Preprocessing:
    """The preprocessing a file was trained with, as its sidecar records it (export writes crop_pct, mean and
    std), each field falling back to the family's default."""
    return Preprocessing(default.size, float(sidecar.get('crop_pct', default.crop_pct)),
                         tuple(sidecar.get('mean', default.mean)), tuple(sidecar.get('std', default.std)))


def with_published_weights(model: nn.Module, pretrained, published_file: Callable[[], Path],
                           load: Callable[[nn.Module, Path], None]) -> nn.Module:
    """`model` with the published weights loaded by `load` (a strict, every-key loader) when `pretrained` is True
    (`published_file()` downloads them, or finds them in the cache) or a local file; as built when it is False."""
    if pretrained is True:
        pretrained = published_file()
    if pretrained:
        load(model, pretrained)
    return model


def _entries() -> dict[str, Family]:
    from . import cnn, teacher, vit
    return {family.name: family for family in (cnn.FAMILY, vit.FAMILY, teacher.FAMILY)}


FAMILIES: dict[str, Family] = _entries()
# the families `export.py` writes and `submit` loads, in the order export goes through them
DELIVERED: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.delivery)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f'unknown model family {name!r}; expected one of: {", ".join(FAMILIES)}') from None


def family_of(state_dict: StateDict) -> str | None:
    """The delivered family whose key names `state_dict` has ('cnn', 'vit'), or None."""
    return next((name for name in DELIVERED if FAMILIES[name].delivery.owns(state_dict)), None)
