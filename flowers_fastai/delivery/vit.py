"""The ViT's delivery: the open_clip CLIP image tower (ViT-L/14 for real work) with a `Linear(output_dim, 5)` head.

Delivered as the tower's `visual.state_dict()` under `visual.` plus `head.weight` / `head.bias`; `submit` serves it
through `inference_nets.ClipViTClassifier` (same keys, no open_clip import). What tensors cannot tell (QuickGELU
or GELU, the head width, the weights' normalisation) travels in the sidecar.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..architectures import ArchitectureError, ClipTowerSpec, infer_clip_spec, load_exactly
from ..inference_nets import ClipViTClassifier
from ..preprocess import Preprocessing, vit_preprocessing
from ..recipes import VIT
from ..run_config import RunConfig
from .entry import Delivery, StateDict


def owns(state_dict: StateDict) -> bool:
    return any(k.startswith('visual.') for k in state_dict)


def tower_spec(state_dict: StateDict, sidecar) -> ClipTowerSpec:
    """The tower's shape from its tensors, and what they cannot tell from the sidecar (OpenAI's QuickGELU and
    64-wide heads when it says nothing)."""
    return infer_clip_spec(state_dict, quick_gelu=True if sidecar.quick_gelu is None else sidecar.quick_gelu,
                           head_width=sidecar.head_width or 64)


def build(state_dict: StateDict, sidecar, path: Path) -> tuple[nn.Module, Preprocessing]:
    try:
        spec = tower_spec(state_dict, sidecar)
    except ArchitectureError as err:
        raise ValueError(f'{path}: {err}') from None
    if spec.width % spec.head_width:
        raise ValueError(f'{path.with_suffix(".json")}: field "head_width" ({spec.head_width}) must divide the '
                         f'width of the tower in {path.name} ({spec.width})')
    if sidecar.image_size not in (None, spec.image_size):
        raise ValueError(f'{path.with_suffix(".json")}: field "image_size" says {sidecar.image_size} but the '
                         f'positional embedding in {path.name} is for {spec.image_size} px')
    with torch.device('meta'):
        model = ClipViTClassifier(spec).float()
    load_exactly(model, state_dict, str(path), assign=True)
    return model, sidecar.preprocessing(vit_preprocessing(spec.image_size))


def sidecar_fields(config: RunConfig, model: nn.Module) -> dict:
    spec = model.spec
    return {'arch': spec.name, 'quick_gelu': spec.quick_gelu, 'head_width': spec.head_width}


def network_config(state_dict: StateDict, sidecar, preprocessing: Preprocessing) -> RunConfig:
    return RunConfig(recipe=VIT, preprocessing=preprocessing, clip_spec=tower_spec(state_dict, sidecar).to_dict())


DELIVERY = Delivery(name='vit', title='a CLIP ViT', weights_file='vit_flowers.pth', head_key='head.weight',
                    owns=owns, build=build, sidecar_fields=sidecar_fields, network_config=network_config)
