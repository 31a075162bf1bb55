"""The CNN's delivery: timm ConvNeXt V2 with a `Linear(in_features, 5)` head.

Delivered as exactly the keys of `timm.create_model('convnextv2_<size>', num_classes=5).state_dict()`; `submit`
serves it through `inference_nets.ConvNeXtV2` (same keys, no timm import).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..architectures import CONVNEXTV2_SIZES, ArchitectureError, infer_cnn_arch, load_exactly
from ..inference_nets import ConvNeXtV2
from ..preprocess import Preprocessing, cnn_preprocessing
from ..recipes import CNN
from ..run_config import RunConfig
from .entry import Delivery, StateDict


def owns(state_dict: StateDict) -> bool:
    return 'stem.0.weight' in state_dict and any(k.startswith('stages.') for k in state_dict)


def build(state_dict: StateDict, sidecar, path: Path) -> tuple[nn.Module, Preprocessing]:
    try:
        size = infer_cnn_arch(state_dict).removeprefix('convnextv2_')
    except ArchitectureError as err:
        raise ValueError(f'{path}: {err}') from None
    with torch.device('meta'):   # no random initialisation: every tensor comes from the file
        model = ConvNeXtV2(*CONVNEXTV2_SIZES[size]).float()   # float32 even under set_default_dtype(float64)
    load_exactly(model, state_dict, str(path), assign=True)
    # without a sidecar: the default weights' preprocessing at 224 px (a test checks it against timm's config)
    return model, sidecar.preprocessing(cnn_preprocessing(sidecar.image_size or 224))


def sidecar_fields(config: RunConfig, model: nn.Module) -> dict:
    return {'arch': config.recipe.arch.split('.')[0]}


def network_config(state_dict: StateDict, sidecar, preprocessing: Preprocessing) -> RunConfig:
    return RunConfig(recipe=CNN.override(arch=infer_cnn_arch(state_dict)), preprocessing=preprocessing)


DELIVERY = Delivery(name='cnn', title='a ConvNeXt V2 CNN', weights_file='cnn_flowers.pth', head_key='head.fc.weight',
                    owns=owns, build=build, sidecar_fields=sidecar_fields, network_config=network_config)
