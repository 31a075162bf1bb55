"""A run's checkpoint files under <run>/models/: best.pth and the one resume point, last.pth, written atomically
in fastai's `learn.save` layout and read back with `weights_only=True`. Shared by the checkpoint callbacks
(callbacks.py) and the training glue (training.py), which is why they live in neither."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier, get_model

from .run_folder import RunFolderError, atomic_write, load_checkpoint
from .lora import has_lora, merge_lora, merge_lora_state
from .recipes import Recipe


BEST, LAST = 'best', 'last'   # checkpoint names under <run>/models/
RESUME_TODO = 'this run cannot continue: train it again under another --name (or delete its folder first)'


def finite(x) -> float | None:
    """A number for JSON (the resume point, metrics.json): None where there is none (-inf before any epoch, NaN)."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _plain(obj):
    """fastai's optimizer state with its fastcore `L` lists as plain lists and NumPy scalars as Python numbers:
    tensors, numbers and plain containers only, what `torch.load(weights_only=True)` reads without extra globals."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == 'L':
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):   # the schedulers' NumPy floats (lr, mom) as Python numbers
        return obj.item()
    return obj


def save_checkpoint(learn: Learner, name: str, with_opt: bool, extra: dict | None = None) -> Path:
    """fastai's `learn.save` (same layout: the state_dict, or {'model', 'opt'}, + `extra` entries), written to a
    temporary file and renamed over the old one, so that an interrupted write leaves the previous checkpoint
    whole."""
    path = learn.path / learn.model_dir / f'{name}.pth'
    state = get_model(learn.model).state_dict()
    if with_opt or extra:
        state = {'model': state, **(extra or {})}
        if with_opt and learn.opt is not None:
            state['opt'] = _plain(learn.opt.state_dict())
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def restore_checkpoint(learn: Learner, name: str, recipe: Recipe | None, with_opt: bool,
                     saved: dict | None = None) -> None:
    """fastai's `learn.load`, read with `weights_only=True` (a crafted checkpoint is refused, none of its code
    runs; a truncated or missing one is a `RunFolderError` naming it), also across a LoRA merge: a merged
    checkpoint (saved during the light full fine-tune) makes a LoRA model merge first; a LoRA checkpoint for a
    merged model (a best epoch from before the merge) is merged on the fly, without optimizer state, which
    belonged to the LoRA updates. `saved`: the file's content, when it was read already."""
    from fastcore.foundation import L
    path = learn.path / learn.model_dir / f'{name}.pth'
    if saved is None:
        distrib_barrier()   # as in fastai's load: under data-parallel training the main process has written it
        saved = load_checkpoint(path, RESUME_TODO, map_location=getattr(learn.dls, 'device', None) or 'cpu')
    nested = isinstance(saved.get('model'), dict)   # {'model', 'opt', ...}: fastai's save(with_opt=True) layout
    has_opt = nested and 'opt' in saved
    state = saved['model'] if nested else saved
    try:
        if recipe is not None and recipe.lora_rank:
            if has_lora(learn.model) and not has_lora(state):
                merge_lora(learn.model)
                learn.opt = None   # built again below, over the merged weights
            elif has_lora(state) and not has_lora(learn.model):
                learn.model.load_state_dict(merge_lora_state(state, recipe.lora_alpha))
                return
        if learn.opt is None:
            learn.create_opt()
        get_model(learn.model).load_state_dict(state)
        if with_opt and has_opt:
            learn.opt.load_state_dict({**saved['opt'], 'hypers': L(saved['opt']['hypers'])})
        elif with_opt:
            warnings.warn(f'{path} holds no optimizer state: the optimizer starts afresh')
    except (RuntimeError, KeyError, TypeError, AssertionError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFolderError(f'{path} does not fit this run\'s model ({first_line}): {RESUME_TODO}') from None


def save_resume_point(learn: Learner, phase: int, epoch: int, best, ema_state: dict | None) -> Path:
    """models/last.pth: fastai's `save(with_opt=True)` layout ({'model', 'opt'}) plus the EMA and the position,
    in one file written atomically, so that weights, average and position always belong to the same epoch.
    `epoch` -1: phase `phase` has not started."""
    position = {'phase': phase, 'epoch': epoch, 'best': finite(best)}
    if ema_state is not None:   # callbacks.WeightEMA.state()
        position['ema'] = ema_state
    return save_checkpoint(learn, LAST, with_opt=True, extra=position)


def resume_point_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / 'models' / f'{LAST}.pth'


def read_resume_point(path: Path, map_location='cpu') -> dict:
    """models/last.pth (`save_resume_point`), read with weights_only and checked: a broken one is a sentence
    naming it, not a KeyError later."""
    state = load_checkpoint(path, RESUME_TODO, map_location=map_location)
    ema = state.get('ema')
    ok = (isinstance(state.get('model'), dict) and isinstance(state.get('phase'), int) and state['phase'] >= 0
          and isinstance(state.get('epoch'), int) and state['epoch'] >= -1
          and (state.get('best') is None or isinstance(state['best'], (int, float)))
          and (ema is None or (isinstance(ema, dict) and isinstance(ema.get('ema'), dict)
                               and isinstance(ema.get('steps'), int))))
    if not ok:
        raise RunFolderError(f'{path} is not a resume point (model, optimizer, phase, epoch, best, EMA): '
                             f'{RESUME_TODO}')
    return state

