"""A run's best weights -> the raw state_dict file (+ JSON sidecar) that `submit` loads, calibrated on the run's
validation split (temperature scaling, stored in the sidecar)."""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from .distill import without_distill_head
from .architectures import ArchitectureError
from .families import DELIVERED, get_family
from .labels import CLASSES
from .recipes import Recipe

FAMILIES = DELIVERED   # the families export writes, in order
VALID_ITEMS = 'valid_items.csv'   # the run's validation photos (path, label), written by training
EXPORT_TODO = 'this run cannot be exported: train it again, or export another run with --run'


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


def unpickling_reason(err: Exception) -> str:
    """The line of torch's weights_only refusal that says what was refused (its first line advises
    `weights_only=False`, which is exactly what must not be done), without terminal colour codes."""
    import re
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(err))
    for line in text.splitlines():
        if 'WeightsUnpickler error:' in line:
            return line.split('WeightsUnpickler error:', 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


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
        with torch.serialization.safe_globals(_fastai_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RunFolderError(f'{path} is refused: it is not a checkpoint of tensors but a pickle that would need to '
                             f'run code to load ({unpickling_reason(err)}): {todo}') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError,
            IndexError, TypeError) as err:   # what torch raises for truncated or foreign bytes
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ''
        raise RunFolderError(f'{path} cannot be read (truncated by an interrupted write?: {type(err).__name__}: '
                             f'{first_line}): {todo}') from None
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


def run_config(run_dir: Path, todo: str = EXPORT_TODO) -> dict:
    """The run's config.json (a seeds experiment: its best seed's), checked for what every reader needs."""
    run = resolve_run(run_dir, todo)
    config_path = run / 'config.json'
    if not config_path.is_file():
        raise RunFolderError(f'{run} is not a finished training run folder (no config.json): {todo}')
    config = read_json(config_path, todo)
    if not isinstance(config.get('recipe'), dict) or not isinstance(config['recipe'].get('family'), str):
        raise RunFolderError(f'{config_path} has no recipe with a model family: {todo}')
    return config


def finished_runs(runs_dir: Path, family: str, warn: Callable[[str], None] | None = None) -> list[Path]:
    """The finished runs and seeds experiments of `family` under `runs_dir`, newest first. One whose config
    cannot be read is skipped, and `warn` is told which and why: one broken run blocks no other."""
    finished = {p.parent: p.stat().st_mtime for pattern in ('*/metrics.json', '*/summary.json')
                for p in Path(runs_dir).glob(pattern)}
    runs = []
    for run in sorted(finished, key=finished.get, reverse=True):
        try:
            if run_config(run)['recipe']['family'] == family:
                runs.append(run)
        except RunFolderError as err:
            if warn is not None:
                warn(f'skipped {run}: {err}')
    return runs


def latest_run(runs_dir: Path, family: str) -> Path | None:
    """The most recently finished run or seeds experiment of `family` under `runs_dir` (broken ones skipped,
    with a warning)."""
    import warnings
    runs = finished_runs(runs_dir, family, warn=warnings.warn)
    return runs[0] if runs else None


def rebuild_split(config: dict):
    """The run's photos and its split, rebuilt from config.json the way training made them (`split_photos`, one
    folder or several): (items, train_idx, valid_idx, audit), indices into items; audit: duplicate groups across
    every folder (computed here for a stratified split too, for leak checks). For runs that predate
    `valid_items.csv`, and for leak checks."""
    from .audit import audit_items
    from .data import split_photos
    split, split_seed = config.get('split', 'stratified'), Recipe.from_dict(config['recipe']).data_split_seed
    photos = split_photos(config['data'], split, config['recipe']['valid_pct'], split_seed)
    audit = photos.audit or audit_items(photos.items)
    return photos.items, photos.train_idx, photos.valid_idx, audit


def validation_items(run_dir: Path) -> list[tuple[Path, str]]:
    """The run's validation photos: `valid_items.csv` (written by training), else the rebuilt split."""
    listed = Path(run_dir) / VALID_ITEMS
    if listed.is_file():
        with listed.open(newline='') as f:
            return [(Path(row['path']), row['label']) for row in csv.DictReader(f)]
    items, _, valid_idx, _ = rebuild_split(run_config(run_dir))
    return [items[i] for i in valid_idx]


def calibrate(weights: Path, items: list[tuple[Path, str]], report_dir: Path) -> dict:
    """Temperature scaling of the exported file on `items` (through `submit`, as users will run it): the fitted
    T, NLL and expected calibration error before/after, and a reliability diagram PNG in `report_dir`."""
    from .calibration import expected_calibration_error, fit_temperature, reliability_diagram, temperature_nll
    from .inference import predict_files
    from .submit import load_model
    results = list(predict_files(load_model(weights), [p for p, _ in items], batch_size=32))
    kept = [(r, label) for r, (_, label) in zip(results, items) if r.error is None]
    if not kept:
        raise ValueError('no validation photo could be read: nothing to calibrate on')
    probs = torch.tensor([[r.probabilities[c] for c in CLASSES] for r, _ in kept], dtype=torch.float64)
    labels = torch.tensor([CLASSES.index(label) for _, label in kept])
    logits = probs.clamp_min(1e-300).log()    # = logits - logsumexp per row: same softmax at every T
    t = fit_temperature(logits, labels)
    calibrated = (logits / t).softmax(-1)
    diagram = reliability_diagram(probs, calibrated, labels, Path(report_dir) / 'reliability.png',
                                  title=f'{weights.name}: validation split, T = {t:.3f}')
    return {'temperature': t, 'n_valid': len(kept), 'nll_before': temperature_nll(logits, labels, 1.0),
            'nll_after': temperature_nll(logits, labels, t), 'ece_before': expected_calibration_error(probs, labels),
            'ece_after': expected_calibration_error(calibrated, labels), 'reliability_diagram': str(diagram)}


def _as_submit_reads_it(staged: Path, run_dir: Path) -> None:
    """`RunFolderError` unless `submit`'s own loader takes the staged file and its sidecar (finite weights,
    finite logits on its probe image, valid sidecar fields): export never replaces a file with one that `submit`
    would refuse (a diverged run, an fp16 overflow with --half, a config field out of range)."""
    from .submit import load_model
    try:
        load_model(staged)
    except (ValueError, OSError) as err:
        reason = str(err).replace(str(staged.parent) + os.sep, '')
        raise RunFolderError(f'{run_dir}: the exported file would be refused by submit\'s loader ({reason}); nothing '
                             f'was written: {EXPORT_TODO}') from None


def export_run(run_dir: str | Path, out: str | Path, half: bool = False, calibrated: bool = True) -> Path:
    """Write `run_dir`'s models/best.pth (a seeds experiment: its best seed's) as a raw state_dict at `out`
    (fp16 with `half`), plus `out`.json.

    The weights are first loaded into the network `submit` builds, every key checked, so that an export
    that `submit` could not load fails here and not on the user's machine. With `calibrated`, a temperature
    is fitted on the run's validation photos (see `calibrate`) and stored in the sidecar as `temperature`
    (with the calibration numbers under `calibration`); `submit.predict_proba` divides the logits by it.
    """
    run_dir, out = resolve_run(run_dir), Path(out)
    config = run_config(run_dir)
    best = run_dir / 'models' / 'best.pth'
    state = load_weights(best, EXPORT_TODO)   # weights_only: a crafted pickle is refused, nothing runs

    try:   # a config.json that parses but lacks a field: one sentence, not a KeyError
        recipe, pp = config['recipe'], config['preprocessing']
        family = get_family(recipe['family'])
        if family.delivery is None:
            raise ValueError(f'the {family.name} family is not delivered (only {", ".join(DELIVERED)} are)')
        model = family.trained_network(config, state, str(best))
        sidecar = {'family': family.name, **family.delivery.sidecar(config, model),
                   'image_size': pp['size'], 'crop_pct': pp['crop_pct'], 'mean': pp['mean'], 'std': pp['std'],
                   'classes': config['classes']}
    except ArchitectureError as err:
        raise RunFolderError(f'{err}: {EXPORT_TODO}') from None
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise RunFolderError(f'{run_dir / "config.json"} does not describe a model export can build '
                             f'({type(err).__name__}: {err}): {EXPORT_TODO}') from None
    state_dict = model.state_dict()   # the published key order: the family's network loaded, LoRA folded in
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}

    metrics_path = run_dir / 'metrics.json'
    metrics = read_json(metrics_path, EXPORT_TODO) if metrics_path.is_file() else {}
    accuracy = metrics.get('valid_accuracy')
    sidecar.update(dtype='float16' if half else 'float32', run=run_dir.name, exported=date.today().isoformat(),
                   valid_accuracy=float(accuracy) if isinstance(accuracy, (int, float)) and math.isfinite(accuracy)
                   else None)

    # Both files are written and calibrated in a private folder beside `out`, then renamed over the old ones:
    # a file being served (the demo) keeps its old content until the rename, and a failure anywhere (disk
    # full, an interrupted export) leaves the old pair as it was and no temporary file behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp'))
    try:
        staged = staging / out.name
        torch.save(state_dict, staged)
        staged.with_suffix('.json').write_text(json.dumps(sidecar, indent=2, allow_nan=False) + '\n')
        _as_submit_reads_it(staged, run_dir)   # before calibrating: a refused file is no photo's fault
        if calibrated:
            try:
                report = calibrate(staged, validation_items(run_dir), run_dir)
            except (OSError, ValueError, KeyError, csv.Error) as err:   # e.g. a machine without the training photos
                print(f'warning: {out.name} is not calibrated (temperature 1.0): its validation photos cannot be '
                      f'read ({err}); export with the data present, or pass --no-calibrate to silence this')
            else:
                sidecar.update(temperature=report['temperature'], calibration=report)
                staged.with_suffix('.json').write_text(json.dumps(sidecar, indent=2, allow_nan=False) + '\n')
        _as_submit_reads_it(staged, run_dir)   # the pair exactly as it will be renamed into place
        for path in (staged, staged.with_suffix('.json')):
            with path.open('rb') as f:
                os.fsync(f.fileno())
        os.replace(staged, out)
        os.replace(staged.with_suffix('.json'), out.with_suffix('.json'))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
