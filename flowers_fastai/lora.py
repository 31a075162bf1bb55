"""LoRA (low-rank adaptation, Hu et al. 2021) on the CLIP image tower's attention and MLP projections.

Written with `torch.nn.utils.parametrize` rather than PEFT: open_clip's attention keeps its input projection as
`nn.MultiheadAttention.in_proj_weight`, a bare parameter that PEFT's LoRA layers do not wrap, while a
parametrization adapts any weight tensor. `merge_lora` folds the low-rank updates back into plain weights, so the
exported `vit_flowers.pth` keeps the plain open_clip key layout that `submit` loads.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

# (sub-module path inside a transformer block, weight name): attention in/out, MLP in/out projections
TARGETS = (('attn', 'in_proj_weight'), ('attn.out_proj', 'weight'), ('mlp.c_fc', 'weight'), ('mlp.c_proj', 'weight'))


class LoRAUpdate(nn.Module):
    """W -> W + (alpha / rank) * B @ A, with B = 0 at the start, so the adapted model begins as the original."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype) * self.scale


def apply_lora(visual: nn.Module, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Adapt every block of an open_clip image tower in place. All its original parameters are frozen; returns
    the new trainable LoRA parameters."""
    visual.requires_grad_(False)
    trainable = []
    for block in visual.transformer.resblocks:
        for path, name in TARGETS:
            module = block.get_submodule(path)
            out_features, in_features = getattr(module, name).shape
            update = LoRAUpdate(out_features, in_features, rank, alpha)
            parametrize.register_parametrization(module, name, update)
            trainable += [update.A, update.B]
    return trainable


def is_lora_parameter(name: str) -> bool:
    """True for the A and B matrices a LoRA parametrization adds (names '...parametrizations.<w>.0.A')."""
    return '.parametrizations.' in name and name.rsplit('.', 1)[-1] in ('A', 'B')


def has_lora(keys) -> bool:
    """True if a model (its parameter names) or a state_dict (its keys) carries LoRA updates."""
    names = [name for name, _ in keys.named_parameters()] if isinstance(keys, nn.Module) else list(keys)
    return any(is_lora_parameter(name) for name in names)


def merge_lora_state(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The state_dict of a LoRA-adapted model -> that of the merged model, without building it: for checkpoints
    saved before `merge_lora` (a run whose last phase trains the merged weights resumes from, and keeps its
    best epoch in, either form). Same arithmetic as `LoRAUpdate`; the rank is read off A."""
    merged = {}
    for key, value in state.items():
        if '.parametrizations.' not in key:
            merged[key] = value
            continue
        prefix, rest = key.split('.parametrizations.')
        name, leaf = rest.split('.', 1)
        if leaf == 'original':    # '<name>.0.A' and '<name>.0.B' are folded in here
            A, B = state[f'{prefix}.parametrizations.{name}.0.A'], state[f'{prefix}.parametrizations.{name}.0.B']
            merged[f'{prefix}.{name}'] = value + (B @ A).to(value.dtype) * (alpha / A.shape[0])
    return merged


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight (in place): the model becomes plain again, same outputs."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model
