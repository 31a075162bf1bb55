"""A run folder as training writes it and every later command reads it: its JSON files written atomically, its
checkpoints read safely (`weights_io.read_torch_file`: no code runs, nothing oversized is allocated), its
config.json (`read_run_config`), and a seeds experiment resolved to its best seed. Every failure is a
`RunFolderError`: one sentence naming the file and what to do."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .run_config import RunConfig
from .weights_io import UnreadableFile, read_torch_file

VALID_ITEMS = 'valid_items.csv'   # the run's validation photos (path, label), written by training
EXPORT_TODO = 'this run cannot be exported: train it again, or export another run with --run'
# distillation's projection of a student's features onto its teacher's: saved in checkpoints (it trains with
# the head), never part of a delivered or teaching network
DISTILL_HEAD = 'distill_head'


def without_distill_head(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(DISTILL_HEAD + '.')}


class RunFolderError(ValueError):
    """A run folder's file is missing, truncated, refused or not what training writes: said in one sentence that
    names the file and what to do (train.py and export.py print it without a traceback)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary file in `path`'s folder, which then replaces `path` in one `os.replace`:
    a reader (the demo serving the file, a resume) sees the old file or the new one, never a part of one; a
    failure or a crash leaves the old file as it was and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with tmp.open('rb') as f:
            os.fsync(f.fileno())          # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    """Strict JSON (NaN / Infinity refused: they are not JSON), written atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + '\n'
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path, todo: str) -> dict:
    """A run folder's JSON file, or `RunFolderError` naming it and `todo` (what the user can do)."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f'{path} is missing: {todo}')
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise RunFolderError(f'{path} is not valid JSON (truncated by an interrupted write?: {err}): {todo}') from None
    if not isinstance(obj, dict):
        raise RunFolderError(f'{path} holds a JSON {type(obj).__name__}, not the object training writes: {todo}')
    return obj


def _fastai_safe_globals() -> list:
    """What fastai 2.8's `load_model` allow-lists for `weights_only=True`: fastcore's `L` and NumPy scalars."""
    import numpy as np
    from fastcore.foundation import L
    multiarray = getattr(getattr(np, '_core', None), 'multiarray', None) or np.core.multiarray
    return [L, multiarray.scalar, np.dtype, *[getattr(np.dtypes, name) for name in np.dtypes.__all__]]


def load_checkpoint(path: str | Path, todo: str, map_location='cpu') -> dict:
    """A checkpoint this project wrote (models/best.pth, last.pth), read with `weights_only=True`:
    tensors and plain containers only, so a crafted pickle is refused and none of its code runs. fastcore's `L`
    and NumPy scalars are allowed because fastai's `learn.save` stores the optimizer state with them (runs saved
    before this project wrote it as plain lists and floats); fastai's own `load_model` allows the same, and none
    of them runs code. Anything unreadable is a `RunFolderError`."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f'{path} is missing: {todo}')
    try:
        obj = read_torch_file(path, safe_globals=_fastai_safe_globals(), map_location=map_location)
    except UnreadableFile as err:
        if err.kind == 'runs_code':
            raise RunFolderError(f'{path} is refused: it is not a checkpoint of tensors but a pickle that would need '
                                 f'to run code to load ({err.detail}): {todo}') from None
        raise RunFolderError(f'{path} cannot be read (truncated by an interrupted write?: {err.detail}): {todo}') from None
    if not isinstance(obj, dict) or not obj:
        raise RunFolderError(f'{path} holds a {type(obj).__name__}, not a checkpoint: {todo}')
    return obj


def load_weights(path: str | Path, todo: str) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint this project wrote, or of an exported file (`load_checkpoint`): the
    state_dict nested under 'model' by `save(with_opt=True)` unwrapped, every key a str and every value a tensor
    (else `RunFolderError`), and distillation's feature projection, which is training-only, left out."""
    state = load_checkpoint(path, todo)
    state = state.get('model', state)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise RunFolderError(f'{path} holds no state_dict of tensors: {todo}')
    return without_distill_head(state)


def resolve_run(run_dir: Path, todo: str = EXPORT_TODO) -> Path:
    """A run folder as is; a seeds experiment (summary.json, see experiments.py) as its global best seed."""
    run_dir = Path(run_dir)
    summary = run_dir / 'summary.json'
    if not summary.is_file():
        return run_dir
    best = read_json(summary, todo).get('best_run')
    if not isinstance(best, str) or not best or not (run_dir / best).is_dir():
        raise RunFolderError(f'{summary} names {best!r} as its best seed, which is no folder under {run_dir}: {todo}')
    return run_dir / best


def read_run_config(run_dir: Path, todo: str = EXPORT_TODO) -> RunConfig:
    """The run's config.json (a seeds experiment: its best seed's), checked for what every reader needs."""
    run = resolve_run(run_dir, todo)
    config_path = run / 'config.json'
    if not config_path.is_file():
        raise RunFolderError(f'{run} is not a finished training run folder (no config.json): {todo}')
    try:
        return RunConfig.from_dict(read_json(config_path, todo), str(config_path))
    except RunFolderError:
        raise
    except ValueError as err:
        raise RunFolderError(f'{err}: {todo}') from None


