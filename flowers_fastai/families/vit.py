"""The ViT family, training side: the open_clip CLIP image tower (ViT-L/14 for real work) with a
`Linear(output_dim, 5)` head. How it ships: `flowers_fastai/delivery/vit.py`."""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..architectures import ClipClassifier, ClipTowerSpec, clip_spec_from_open_clip, load_exactly
from ..delivery import StateDict, vit as delivery
from ..lora import apply_lora, has_lora, is_lora_parameter, merge_lora
from ..preprocess import Preprocessing, vit_preprocessing
from ..recipes import VIT, Recipe
from ..run_config import RunConfig
from .entry import Family, with_published_weights


def create(recipe: Recipe, pretrained=True) -> nn.Module:
    """The tower built from open_clip's config without download, then the published tower loaded by our own
    strict loader (it also reads OpenAI's TorchScript archive without running it); LoRA last, over the loaded
    weights."""
    from ..pretrained import clip_pretrained_file, load_clip_backbone
    spec = clip_spec_from_open_clip(recipe.arch)
    if spec.image_size != recipe.size:
        raise ValueError(f'{recipe.arch} works at {spec.image_size} px, not {recipe.size}: '
                         'choose the 336 px variant (e.g. ViT-L-14-336) by its name instead')
    model = with_published_weights(ClipClassifier(spec), pretrained,
                                   lambda: clip_pretrained_file(recipe.arch, recipe.pretrained_tag), load_clip_backbone)
    if recipe.lora_rank:
        apply_lora(model.visual, recipe.lora_rank, recipe.lora_alpha)
    return model


def splitter(model: ClipClassifier) -> list[list[nn.Parameter]]:
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


@functools.lru_cache(maxsize=None)
def clip_weights_preprocessing(arch: str, tag: str, size: int) -> Preprocessing:
    """open_clip's eval preprocessing of the weights `arch` / `tag`: resize the shorter side, center crop, and
    the normalisation those weights were trained with (OpenAI's statistics; 0.5 / 0.5 for some OpenCLIP
    weights). OpenAI's statistics where open_clip publishes no such weights (a run from scratch)."""
    from open_clip.pretrained import get_pretrained_cfg
    cfg = get_pretrained_cfg(arch, tag) if tag else {}
    default = vit_preprocessing(size)
    return Preprocessing(size, 1.0, tuple(map(float, cfg.get('mean', default.mean))),
                         tuple(map(float, cfg.get('std', default.std))))


def trained_network(config: RunConfig, state: StateDict, what: str) -> nn.Module:
    """The run's network. LoRA updates (a best epoch before any light full fine-tune) are folded into plain
    weights, which then go into a plain network: its state_dict has the published key order again."""
    recipe, spec = config.recipe, ClipTowerSpec(**config.clip_spec)
    model = ClipClassifier(spec)
    if not has_lora(state):
        load_exactly(model, state, what)
        return model
    apply_lora(model.visual, recipe.lora_rank, recipe.lora_alpha)
    load_exactly(model, state, what)
    with torch.device('meta'):
        plain = ClipClassifier(spec)
    load_exactly(plain, merge_lora(model).state_dict(), what, assign=True)
    return plain


FAMILY = Family(name='vit', recipe=VIT, create=create, splitter=splitter, preprocessing=clip_weights_preprocessing,
                trained_network=trained_network, network_config=lambda model: {'clip_spec': model.spec.to_dict()},
                delivery=delivery.DELIVERY)
