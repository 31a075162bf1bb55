"""The networks of the two delivered families, built without any download, their shapes read off a state_dict's
tensors, and the strict loader every weight goes through (`load_exactly`).

The families (`families/`) build their training networks here and read exported files with the same shape
readers, so the weights a run exports always fit the network `submit` builds.

Key layouts (the contract of the exported `.pth` files):
- CNN: exactly the keys of `timm.create_model('convnextv2_<size>', num_classes=5).state_dict()`.
- ViT: the open_clip image tower's `visual.state_dict()` under the prefix `visual.`, plus `head.weight`
  (5 x the tower's output dim) and `head.bias`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .labels import CLASSES

NUM_CLASSES = len(CLASSES)

# timm's ConvNeXt V2 family: (depths, dims) -> name.
CONVNEXTV2_SIZES = {
    'atto': ((2, 2, 6, 2), (40, 80, 160, 320)),
    'femto': ((2, 2, 6, 2), (48, 96, 192, 384)),
    'pico': ((2, 2, 6, 2), (64, 128, 256, 512)),
    'nano': ((2, 2, 8, 2), (80, 160, 320, 640)),
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
    'huge': ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


class ArchitectureError(ValueError):
    """A state_dict that is not one of this project's models, or not the one expected."""


# ---------------------------------------------------------------------------------------------- CNN
def build_cnn(arch: str = 'convnextv2_tiny', drop_path_rate: float = 0.0) -> nn.Module:
    """timm ConvNeXt V2 with a fresh `Linear(in_features, 5)` head; never downloads."""
    import timm  # imported here so that `submit` pays for timm only when it loads a CNN
    if not arch.startswith('convnextv2_') or arch.split('.')[0].removeprefix('convnextv2_') not in CONVNEXTV2_SIZES:
        raise ArchitectureError(f'unknown CNN architecture {arch!r}; expected one of '
                                + ', '.join(f'convnextv2_{s}' for s in CONVNEXTV2_SIZES))
    return timm.create_model(arch.split('.')[0], pretrained=False, num_classes=NUM_CLASSES,
                             drop_path_rate=drop_path_rate)


def infer_cnn_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """'convnextv2_<size>' from the stem width and the number of blocks per stage."""
    if 'stem.0.weight' not in state_dict:
        raise ArchitectureError('no ConvNeXt V2 stem (stem.0.weight) in this state_dict')
    depths = tuple(len({int(m.group(2)) for k in state_dict
                        if (m := re.match(r'stages\.(\d)\.blocks\.(\d+)\.', k)) and int(m.group(1)) == s})
                   for s in range(4))
    dims = tuple(int(t.shape[0]) if (t := state_dict.get(f'stages.{s}.blocks.0.conv_dw.weight')) is not None
                 and t.ndim else 0 for s in range(4))    # a 0-d tensor here matches no size (load_exactly lists it)
    for size, spec in CONVNEXTV2_SIZES.items():
        if (depths, dims) == spec:
            return f'convnextv2_{size}'
    raise ArchitectureError(f'ConvNeXt-like tensors with depths {depths} and widths {dims} match no ConvNeXt V2 size')


# ---------------------------------------------------------------------------------------------- ViT
@dataclass(frozen=True)
class ClipTowerSpec:
    """What an open_clip `VisionTransformer` needs; all but `quick_gelu` and `head_width` can be read off
    the tensors. `quick_gelu` is True for OpenAI's weights and False for OpenCLIP's (LAION, DataComp)."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    output_dim: int = 768
    head_width: int = 64
    quick_gelu: bool = True

    @property
    def name(self) -> str:
        known = {(768, 12, 16): 'ViT-B-16', (768, 12, 32): 'ViT-B-32', (1024, 24, 14): 'ViT-L-14'}
        base = known.get((self.width, self.layers, self.patch_size), f'ViT-w{self.width}-l{self.layers}-p{self.patch_size}')
        size = f'-{self.image_size}' if self.image_size != 224 else ''
        return base + size + ('-quickgelu' if self.quick_gelu else '')

    def to_dict(self) -> dict:
        return asdict(self)


def clip_spec_from_open_clip(model_name: str) -> ClipTowerSpec:
    """The tower of an open_clip model config, e.g. 'ViT-L-14-quickgelu' or 'ViT-L-14-336'."""
    import open_clip
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ArchitectureError(f'open_clip has no model config named {model_name!r}')
    v = cfg['vision_cfg']
    if v.get('timm_model_name') or isinstance(v.get('layers'), (list, tuple)):
        raise ArchitectureError(f'{model_name!r} is not a plain CLIP ViT image tower')
    return ClipTowerSpec(image_size=v['image_size'], patch_size=v['patch_size'], width=v['width'],
                         layers=v['layers'], output_dim=cfg['embed_dim'], head_width=v.get('head_width', 64),
                         quick_gelu=bool(cfg.get('quick_gelu', False)))


def build_clip_tower(spec: ClipTowerSpec) -> nn.Module:
    """open_clip's CLIP image tower (a `VisionTransformer`), randomly initialised; never downloads."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    cfg = CLIPVisionCfg(layers=spec.layers, width=spec.width, head_width=spec.head_width,
                        patch_size=spec.patch_size, image_size=spec.image_size)
    return _build_vision_tower(spec.output_dim, cfg, quick_gelu=spec.quick_gelu)


class ClipClassifier(nn.Module):
    """CLIP image tower + a `Linear(output_dim, 5)` head. Its state_dict is the ViT file layout."""

    def __init__(self, spec: ClipTowerSpec):
        super().__init__()
        self.spec = spec
        self.visual = build_clip_tower(spec)
        self.head = nn.Linear(spec.output_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def infer_clip_spec(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True, head_width: int = 64,
                    prefix: str = 'visual.') -> ClipTowerSpec:
    """Read a CLIP ViT tower's shape off its tensors (`prefix` + OpenAI/open_clip key names)."""
    try:
        conv1 = state_dict[prefix + 'conv1.weight']            # width x 3 x patch x patch
        pos = state_dict[prefix + 'positional_embedding']      # (grid^2 + 1) x width
        proj = state_dict[prefix + 'proj']                     # width x output_dim
    except KeyError as err:
        raise ArchitectureError(f'no CLIP ViT image tower here: missing {err.args[0]!r}') from None
    # the shapes the tower is built from, checked before building it (a 0-d or empty tensor would otherwise give an
    # IndexError, a ZeroDivisionError or a network of 0 px)
    if conv1.ndim != 4 or conv1.shape[1] != 3 or conv1.shape[2] != conv1.shape[3] or min(conv1.shape) < 1:
        raise ArchitectureError(f'{prefix}conv1.weight of shape {tuple(conv1.shape)} is no patch embedding '
                                '(width x 3 x patch x patch)')
    if pos.ndim != 2 or pos.shape[1] != conv1.shape[0] or pos.shape[0] < 2:
        raise ArchitectureError(f'{prefix}positional_embedding of shape {tuple(pos.shape)} does not fit a width '
                                f'of {conv1.shape[0]}')
    if proj.ndim != 2 or proj.shape[0] != conv1.shape[0] or proj.shape[1] < 1:
        raise ArchitectureError(f'{prefix}proj of shape {tuple(proj.shape)} does not fit a width of {conv1.shape[0]}')
    layers = len({int(m.group(1)) for k in state_dict
                  if (m := re.match(re.escape(prefix) + r'transformer\.resblocks\.(\d+)\.', k))})
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[0]:
        raise ArchitectureError(f'positional embedding of {pos.shape[0]} rows is not a square grid + class token')
    patch = int(conv1.shape[-1])
    return ClipTowerSpec(image_size=grid * patch, patch_size=patch, width=int(conv1.shape[0]), layers=layers,
                         output_dim=int(proj.shape[1]), head_width=head_width, quick_gelu=quick_gelu)


# ---------------------------------------------------------------------------------------------- both
def load_exactly(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """`load_state_dict` that accepts nothing less than every key, with every shape, and nothing more.
    `assign`: the model's tensors become the given ones (a model built on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f'{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}'
                   for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ', '.join(keys[:5]) + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')
        problems = [f'{len(missing)} missing keys: {few(missing)}' if missing else '',
                    f'{len(unexpected)} unexpected keys: {few(unexpected)}' if unexpected else '',
                    f'{len(wrong_shape)} shape mismatches: {few(wrong_shape)}' if wrong_shape else '']
        raise ArchitectureError(f'{what} does not fit the network: ' + '; '.join(p for p in problems if p))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True, assign=assign)
