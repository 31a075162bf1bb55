"""The two model families as fastai sees them: networks with pretrained weights, and parameter groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from torch import nn

from .architectures import (ClipClassifier, build_cnn, clip_spec_from_open_clip)
from .pretrained import (clip_pretrained_file, cnn_pretrained_file, load_clip_backbone, load_cnn_backbone)
from .lora import apply_lora, is_lora_parameter
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
        if recipe.lora_rank:
            apply_lora(model.visual, recipe.lora_rank, recipe.lora_alpha)
        return model
    raise ValueError(f'unknown model family {recipe.family!r}; expected "cnn" or "vit"')


def cnn_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups, bottom to top: [stem], [stage 0] ... [stage 3], [head] (timm ConvNeXt V2).
    fastai freezes all groups but the last N with `freeze_to(-N)`; layer-wise LR decay gives one LR per group."""
    top = list(model.stages[-1].parameters()) + list(model.norm_pre.parameters())
    return ([list(model.stem.parameters())] + [list(stage.parameters()) for stage in model.stages[:-1]]
            + [top, list(model.head.parameters())])


def vit_splitter(model: ClipClassifier) -> list[list[nn.Parameter]]:
    """Parameter groups, bottom to top: [patch embedding, class and position embeddings, ln_pre],
    [block 0] ... [block L-1 + ln_post + proj], [head] (open_clip CLIP image tower)."""
    v = model.visual
    blocks = [list(block.parameters()) for block in v.transformer.resblocks]
    embed = [p for name, p in v.named_parameters() if not name.startswith(('transformer.', 'ln_post', 'proj'))]
    blocks[-1] += list(v.ln_post.parameters()) + [v.proj]
    groups = [embed, *blocks]
    lora = {id(p) for name, p in v.named_parameters() if is_lora_parameter(name)}
    if lora:  # LoRA: of the tower, only the low-rank updates ever train
        groups = [g for g in ([p for p in group if id(p) in lora] for group in groups) if g]
    return [*groups, list(model.head.parameters())]


def layerwise_lrs(n_groups: int, head_lr: float, top_lr: float, decay: float) -> np.ndarray:
    """One LR per parameter group: `head_lr` for the head (last group), `top_lr` for the top backbone group,
    multiplied by `decay` for each group further down."""
    return np.array([top_lr * decay ** (n_groups - 2 - i) for i in range(n_groups - 1)] + [head_lr])


SPLITTERS = {'cnn': cnn_splitter, 'vit': vit_splitter}
