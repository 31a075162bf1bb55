"""The delivery API: load the exported weights and classify photos, offline, on CPU, without fastai.

    from flowers_fastai.submit import load_cnn_model, load_vit_model, predict, CLASSES
    model = load_cnn_model()                 # weights/cnn_flowers.pth
    predict(model, 'examples/rose.jpg')      # -> 'rose'
    predict_proba(model, 'examples/rose.jpg')  # -> {'daisy': 0.01, ..., 'rose': 0.9, ...} (calibrated)
    both = load_ensemble()                   # CNN + ViT, calibrated probabilities averaged; predict(both, ...)
    fast = quantize_int8(load_vit_model())   # optional: the ViT's matmuls in int8 (CPU; see docs/benchmarks.md)

Weight files are raw `state_dict`s (tensors only), read with `torch.load(..., map_location='cpu',
weights_only=True)`: no code in a file ever runs. Their key layout:
- CNN: exactly the keys of `timm.create_model('convnextv2_<size>', num_classes=5).state_dict()`;
- ViT: the open_clip image tower's `visual.state_dict()` under `visual.`, plus `head.weight` / `head.bias`.
The architecture is read off the tensors. An optional sidecar `<name>.json` beside the file (written by
`export.py`) gives what tensors cannot tell: the CNN's input size (default 224); for CLIP, QuickGELU
(True for OpenAI weights, the default) or GELU (OpenCLIP weights); and `temperature`, the calibration
temperature T fitted on the validation split (probabilities are softmax(logits / T); default 1.0).

Errors (the contract a grader's loop can rely on):
- `load_*`: `FileNotFoundError` for a missing file (the message says which command writes it);
  `ValueError` for anything that is not a state_dict of that family with a 5-class head.
- `predict` / `predict_proba`: a class of `CLASSES` / a probability per class for any image PIL can decode;
  `FileNotFoundError` for a missing path; `ValueError` naming the path for anything else (a directory, an
  empty or non-image file, a decompression bomb).
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .architectures import (CONVNEXTV2_SIZES, NUM_CLASSES, family_of, infer_clip_spec, infer_cnn_arch,
                            load_exactly)
from .inference import Ensemble, as_dict, load_image, members, probabilities
from .inference_nets import ClipViTClassifier, ConvNeXtV2, pack_for_cpu, quantize_int8
from .labels import CLASSES
from .preprocess import Preprocessing, cnn_preprocessing, load_for_model, vit_preprocessing

__all__ = ['CLASSES', 'load_cnn_model', 'load_vit_model', 'load_ensemble', 'predict', 'predict_proba',
           'quantize_int8']

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / 'weights'
_HOW_TO_MAKE = {'cnn': 'python train.py cnn && python export.py --family cnn',
                'vit': 'python train.py vit && python export.py --family vit'}
_LOADER = {'cnn': 'load_cnn_model', 'vit': 'load_vit_model'}
_FAMILY_NAME = {'cnn': 'a ConvNeXt V2 CNN', 'vit': 'a CLIP ViT'}


def find_weights(weights_path: str | os.PathLike, family: str | None = None) -> Path:
    """An absolute path as is; a relative one in the current directory first, then in the repo's weights/.
    `FileNotFoundError` lists where it looked (and, for a known `family`, the command that makes the file)."""
    path = Path(weights_path)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, WEIGHTS_DIR / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    how = f'. Train and export one with: {_HOW_TO_MAKE[family]}' if family else ''
    raise FileNotFoundError(f'weights file {weights_path} not found (looked in: {", ".join(map(str, candidates))})'
                            + how)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # mmap: tensors are paged in from the file as they are first used, not copied up front (cold start)
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ''
        if 'fastai' in str(err):
            raise ValueError(f'{path} is a fastai learn.export() pickle, not a raw state_dict: '
                             'turn the run into one with `python export.py --run RUN_DIR`') from None
        if 'Unsupported global' in str(err) or 'Weights only load failed' in str(err):
            raise ValueError(f'{path} is refused: it is a pickle that would need to run code to load '
                             f'({first_line}); only raw state_dicts (tensors) are accepted') from None
        raise ValueError(f'{path} is not a torch weights file ({first_line})') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError) as err:
        # torch raises these for truncated archives and for bytes that are no torch file at all
        raise ValueError(f'{path} is not a readable torch weights file (truncated or another format?): '
                         f'{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}') from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else 'dict that holds more than tensors'
        raise ValueError(f'{path} holds a {kind}, not a raw state_dict of tensors: export it with `python export.py`')
    return obj


def _read_sidecar(path: Path) -> dict:
    sidecar = path.with_suffix('.json')
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{sidecar} (the settings beside {path.name}) is not valid JSON: {err}') from None


def _load(weights_path, family: str | None) -> tuple[dict[str, torch.Tensor], dict, Path, str]:
    """(state_dict, sidecar, path, family) of a weights file, read once and checked. `family` None: the one
    the sidecar names, else the one its key names show."""
    path = find_weights(weights_path, family)
    state_dict = _read_state_dict(path)
    sidecar = _read_sidecar(path)
    found = family_of(state_dict)
    if family is None:
        if found is None:
            raise ValueError(f'{path}: cannot tell whether it holds a CNN or a ViT (no "family" in a sidecar '
                             f'{path.with_suffix(".json").name}, and its keys ({", ".join(list(state_dict)[:3])}, '
                             '...) are those of neither)')
        family = sidecar.get('family') if sidecar.get('family') in _LOADER else found
    if found != family:
        other = (f'it holds {_FAMILY_NAME[found]} model: load it with {_LOADER[found]}()' if found
                 else f'its keys ({", ".join(list(state_dict)[:3])}, ...) are not those of {_FAMILY_NAME[family]} model')
        raise ValueError(f'{path} is not {_FAMILY_NAME[family]} weights file: {other}')
    head = state_dict.get('head.fc.weight' if family == 'cnn' else 'head.weight')
    if head is None or head.ndim != 2:
        raise ValueError(f'{path} has no classification head')
    if head.shape[0] != NUM_CLASSES:
        raise ValueError(f'{path} has a head with {head.shape[0]} classes; this project needs {NUM_CLASSES} ({CLASSES})')
    return state_dict, sidecar, path, family


def _temperature(sidecar: dict, path: Path) -> float:
    value = sidecar.get('temperature', 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float('inf'):
        raise ValueError(f'{path.with_suffix(".json")}: temperature must be a positive number, not {value!r}')
    return float(value)


def _ready(model: nn.Module, family: str, preprocessing: Preprocessing, temperature: float) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    model = pack_for_cpu(model)              # linear weights packed once for oneDNN (a cache; state_dict unchanged)
    model.flowers_family = family            # what `predict` needs to prepare an image for this model
    model.flowers_preprocessing = preprocessing
    model.flowers_temperature = temperature  # calibration: probabilities = softmax(logits / T)
    return model


def load_cnn_model(weights_path='cnn_flowers.pth') -> nn.Module:
    """The ConvNeXt V2 classifier in `weights_path`: a plain PyTorch module in eval mode, on CPU, with timm's
    state_dict layout (`inference_nets.ConvNeXtV2`, written for CPU inference without importing timm)."""
    return _build_cnn(*_load(weights_path, 'cnn')[:3])


def _build_cnn(state_dict: dict[str, torch.Tensor], sidecar: dict, path: Path) -> nn.Module:
    with torch.device('meta'):   # no random initialisation: every tensor comes from the file
        model = ConvNeXtV2(*CONVNEXTV2_SIZES[infer_cnn_arch(state_dict).removeprefix('convnextv2_')])
    load_exactly(model, state_dict, str(path), assign=True)
    return _ready(model, 'cnn', cnn_preprocessing(int(sidecar.get('image_size', 224))), _temperature(sidecar, path))


def load_vit_model(weights_path='vit_flowers.pth') -> nn.Module:
    """The CLIP ViT classifier in `weights_path`: open_clip's image tower + head as a plain PyTorch module in
    eval mode, on CPU, with open_clip's state_dict layout (`inference_nets.ClipViTClassifier`)."""
    return _build_vit(*_load(weights_path, 'vit')[:3])


def _build_vit(state_dict: dict[str, torch.Tensor], sidecar: dict, path: Path) -> nn.Module:
    spec = infer_clip_spec(state_dict, quick_gelu=bool(sidecar.get('quick_gelu', True)),
                           head_width=int(sidecar.get('head_width', 64)))
    with torch.device('meta'):
        model = ClipViTClassifier(spec)
    load_exactly(model, state_dict, str(path), assign=True)
    return _ready(model, 'vit', vit_preprocessing(spec.image_size), _temperature(sidecar, path))


def load_model(weights_path: str | os.PathLike) -> nn.Module:
    """A CNN or a ViT file, whichever it holds (the sidecar's `family`, else its key names), read once."""
    state_dict, sidecar, path, family = _load(weights_path, None)
    return (_build_cnn if family == 'cnn' else _build_vit)(state_dict, sidecar, path)


def load_ensemble(cnn_path='cnn_flowers.pth', vit_path='vit_flowers.pth') -> Ensemble:
    """The CNN and the ViT together: `predict` / `predict_proba` average their calibrated probabilities."""
    return Ensemble([load_cnn_model(cnn_path), load_vit_model(vit_path)])


def _check(model: nn.Module, image_path) -> None:
    members(model)   # TypeError for anything load_* / load_ensemble did not return
    if not isinstance(image_path, (str, os.PathLike)):
        raise TypeError(f'image_path must be a str or os.PathLike, not {type(image_path).__name__}')


def predict(model: nn.Module, image_path: str | os.PathLike) -> str:
    """The class of the photo at `image_path`: the argmax of the model's (or ensemble's) probabilities."""
    _check(model, image_path)
    if isinstance(model, Ensemble):
        p = probabilities(model, [load_image(image_path, model)])[0]
        return CLASSES[int(p.argmax())]
    x = load_for_model(image_path, model.flowers_preprocessing)
    with torch.inference_mode():
        logits = model(x)
    return CLASSES[int(logits[0].float().argmax())]   # = argmax of softmax(logits / T): T > 0 keeps the order


def predict_proba(model: nn.Module, image_path: str | os.PathLike) -> dict[str, float]:
    """Calibrated probability of each class of `CLASSES` for the photo at `image_path` (they add up to 1).
    For one model: softmax(logits / T), T fitted on the validation split at export (1.0 if none was);
    for an ensemble: the mean of its members' calibrated probabilities."""
    _check(model, image_path)
    return as_dict(probabilities(model, [load_image(image_path, model)])[0])
