"""The two model families as fastai sees them: networks with pretrained weights, and parameter groups."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .architectures import (ClipClassifier, build_cnn, clip_spec_from_open_clip)
from .pretrained import (clip_pretrained_file, cnn_pretrained_file, load_clip_backbone, load_cnn_backbone)
from .recipes import Recipe


def create_model(recipe: Recipe, pretrained: bool | str | Path = True) -> nn.Module:
    """The recipe's network with a new 5-class head.

    `pretrained`: True downloads the published weights (timm / open_clip tag of the recipe), a path loads a
    local copy of a published file, False leaves the backbone randomly initialised (from scratch).
    """
    if recipe.family == 'cnn':
        model = build_cnn(recipe.arch, drop_path_rate=recipe.drop_path)
        if pretrained is True:
            pretrained = cnn_pretrained_file(recipe.arch, recipe.pretrained_tag)
        if pretrained:
            load_cnn_backbone(model, pretrained)
        return model
    if recipe.family == 'vit':
        spec = clip_spec_from_open_clip(recipe.arch)
        if spec.image_size != recipe.size:
            raise ValueError(f'{recipe.arch} works at {spec.image_size} px, not {recipe.size}: '
                             'choose the 336 px variant (e.g. ViT-L-14-336) by its name instead')
        model = ClipClassifier(spec)
        if pretrained is True:
            pretrained = clip_pretrained_file(recipe.arch, recipe.pretrained_tag)
        if pretrained:
            load_clip_backbone(model, pretrained)
        return model
    raise ValueError(f'unknown model family {recipe.family!r}; expected "cnn" or "vit"')


def cnn_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """[backbone, head] for fastai's `freeze` and discriminative LRs (timm ConvNeXt: `head` is the head)."""
    head = list(model.head.parameters())
    head_ids = {id(p) for p in head}
    return [[p for p in model.parameters() if id(p) not in head_ids], head]


def vit_splitter(model: ClipClassifier) -> list[list[nn.Parameter]]:
    """[CLIP image tower, head]."""
    return [list(model.visual.parameters()), list(model.head.parameters())]


SPLITTERS = {'cnn': cnn_splitter, 'vit': vit_splitter}
