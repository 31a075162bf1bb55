"""The CNN family, training side: timm ConvNeXt V2 with a `Linear(in_features, 5)` head. How it ships:
`flowers_fastai/delivery/cnn.py`."""
from __future__ import annotations

import functools

from torch import nn

from ..architectures import build_cnn, load_exactly
from ..delivery import StateDict, cnn as delivery
from ..preprocess import Preprocessing
from ..recipes import CNN, Recipe
from ..run_config import RunConfig
from .entry import Family, with_published_weights


def create(recipe: Recipe, pretrained=True) -> nn.Module:
    """timm's network, built without download, then the published backbone loaded by our own strict loader:
    timm's `pretrained=True` with a new head loads with `strict=False`, which would hide a wrong file."""
    from ..pretrained import cnn_pretrained_file, load_cnn_backbone
    return with_published_weights(build_cnn(recipe.arch, drop_path_rate=recipe.drop_path), pretrained,
                                  lambda: cnn_pretrained_file(recipe.arch, recipe.pretrained_tag), load_cnn_backbone)


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups, bottom to top: [stem], [stage 0] ... [stage 3], [head] (timm ConvNeXt V2).
    fastai freezes all groups but the last N with `freeze_to(-N)`; layer-wise LR decay gives one LR per group."""
    top = list(model.stages[-1].parameters()) + list(model.norm_pre.parameters())
    return ([list(model.stem.parameters())] + [list(stage.parameters()) for stage in model.stages[:-1]]
            + [top, list(model.head.parameters())])


@functools.lru_cache(maxsize=None)
def timm_weights_preprocessing(arch: str, tag: str, size: int) -> Preprocessing:
    """timm's eval preprocessing of the published weights `arch.tag` (mean, std, crop_pct; the architecture's
    default weights when `tag` is empty or unknown) at `size` px. Read from timm's pretrained config, without
    building the network."""
    import timm
    from timm.data import resolve_data_config
    name = f'{arch.split(".")[0]}.{tag}' if tag else arch.split('.')[0]
    try:
        cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(arch.split('.')[0])
    except RuntimeError:   # a tag timm does not know (a run from scratch may name any)
        cfg = timm.models.get_pretrained_cfg(arch.split('.')[0])
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {}, use_test_size=False)
    return Preprocessing(size, float(data['crop_pct']), tuple(map(float, data['mean'])), tuple(map(float, data['std'])))


def trained_network(config: RunConfig, state: StateDict, what: str) -> nn.Module:
    model = build_cnn(config.recipe.arch)
    load_exactly(model, state, what)
    return model


FAMILY = Family(name='cnn', recipe=CNN, create=create, splitter=splitter, preprocessing=timm_weights_preprocessing,
                trained_network=trained_network, delivery=delivery.DELIVERY)
