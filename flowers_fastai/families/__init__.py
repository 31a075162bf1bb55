"""The registry of model families, training side: one entry per family, one file per entry (`cnn.py`, `vit.py`,
`teacher.py`).

A family owns everything that differs between models in training: the brief's recipe, how its training network is
built with published weights (downloaded when online, a local file offline, every key checked), its parameter
groups for freezing and layer-wise LR decay, its preprocessing (resolved from the architecture and the weight
tag), and how a run's weights are rebuilt (export, teachers). A family that ships points at its entry of the
delivery registry (`flowers_fastai/delivery/`: the file `submit` loads), which knows nothing of training.
Training, export and distillation look the family up here instead of branching on its name: adding a family is
adding one entry here (with its `Delivery` when it ships).
"""
from __future__ import annotations

from ..delivery import register as register_delivery
from .entry import Family


def _entries() -> dict[str, Family]:
    from . import cnn, teacher, vit
    return {family.name: family for family in (cnn.FAMILY, vit.FAMILY, teacher.FAMILY)}


FAMILIES: dict[str, Family] = _entries()


def register(family: Family) -> Family:
    """Add a family: training, export and (with a `delivery`) `submit`, `predict` and the ensemble find it."""
    if family.name in FAMILIES:
        raise ValueError(f'a model family named {family.name!r} already exists')
    if family.delivery is not None:
        if family.delivery.name != family.name:
            raise ValueError(f'family {family.name!r} ships as {family.delivery.name!r}: give both one name')
        register_delivery(family.delivery)
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f'unknown model family {name!r}; expected one of: {", ".join(FAMILIES)}') from None
