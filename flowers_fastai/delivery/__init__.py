"""The delivered families' registry, the delivery side of each model family: one entry per family that ships,
one file per entry (`cnn.py`, `vit.py`).

An entry says how a family is delivered as a raw state_dict that `submit` loads without fastai: the default file
name, the key names that show the family, the key of its head, and the delivery network built from a file's
tensors and sidecar. `submit`'s loaders, `predict --model`, the ensemble and `export.py` are derived from it.
The training side of each family (recipe, network with published weights, parameter groups) lives in
`flowers_fastai/families/`, whose entries point here; this package imports nothing from training.
"""
from __future__ import annotations

from .entry import Delivery, StateDict

def _entries() -> dict[str, Delivery]:
    from . import cnn, vit
    return {entry.name: entry for entry in (cnn.DELIVERY, vit.DELIVERY)}


# the delivered families, in the order export goes through them and the ensemble stacks them
DELIVERIES: dict[str, Delivery] = _entries()


def register(delivery: Delivery) -> Delivery:
    """Add a delivered family (the training side's `families.register` calls this for a family with a
    delivery); every user of the registry then sees it."""
    if delivery.name in DELIVERIES and DELIVERIES[delivery.name] is not delivery:
        raise ValueError(f'a delivered family named {delivery.name!r} already exists')
    DELIVERIES[delivery.name] = delivery
    return delivery


def get_delivery(name: str) -> Delivery:
    try:
        return DELIVERIES[name]
    except KeyError:
        raise ValueError(f'{name!r} is no delivered family; expected one of: {", ".join(DELIVERIES)}') from None


def delivery_of(state_dict: StateDict) -> str | None:
    """The delivered family whose key names `state_dict` has ('cnn', 'vit'), or None."""
    return next((name for name, entry in DELIVERIES.items() if entry.owns(state_dict)), None)
