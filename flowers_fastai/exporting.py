"""A run's best weights -> the raw state_dict file (+ JSON sidecar) that `submit` loads, calibrated on the run's
validation split (temperature scaling, stored in the sidecar)."""
from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
from datetime import date
from pathlib import Path
from typing import Callable

import torch

from .architectures import ArchitectureError
from .delivery import DELIVERIES
from .families import Family, get_family
from .labels import CLASSES
from .run_config import RunConfig
from .run_folder import (EXPORT_TODO, VALID_ITEMS, RunFolderError, load_weights, read_json, read_run_config,
                         resolve_run)
from .sidecar import Sidecar


def finished_runs(runs_dir: Path, family: str, warn: Callable[[str], None] | None = None) -> list[Path]:
    """The finished runs and seeds experiments of `family` under `runs_dir`, newest first. One whose config
    cannot be read is skipped, and `warn` is told which and why: one broken run blocks no other."""
    finished = {p.parent: p.stat().st_mtime for pattern in ('*/metrics.json', '*/summary.json')
                for p in Path(runs_dir).glob(pattern)}
    runs = []
    for run in sorted(finished, key=finished.get, reverse=True):
        try:
            if read_run_config(run).family == family:
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


def rebuild_split(config: RunConfig):
    """The run's photos and its split, rebuilt from config.json the way training made them (`split_photos`, one
    folder or several): (items, train_idx, valid_idx, audit), indices into items; audit: duplicate groups across
    every folder (computed here for a stratified split too, for leak checks). For runs that predate
    `valid_items.csv`, and for leak checks."""
    from .audit import audit_items
    from .data import split_photos
    photos = split_photos(list(config.data), config.split, config.recipe.valid_pct, config.recipe.data_split_seed)
    audit = photos.audit or audit_items(photos.items)
    return photos.items, photos.train_idx, photos.valid_idx, audit


def validation_items(run_dir: Path) -> list[tuple[Path, str]]:
    """The run's validation photos: `valid_items.csv` (written by training), else the rebuilt split."""
    listed = Path(run_dir) / VALID_ITEMS
    if listed.is_file():
        with listed.open(newline='') as f:
            return [(Path(row['path']), row['label']) for row in csv.DictReader(f)]
    items, _, valid_idx, _ = rebuild_split(read_run_config(run_dir))
    return [items[i] for i in valid_idx]


def calibrate(weights: Path, items: list[tuple[Path, str]], report_dir: Path) -> dict:
    """Temperature scaling of the exported file on `items` (through `submit`, as users will run it): the fitted
    T, NLL and expected calibration error before/after, and a reliability diagram PNG in `report_dir`."""
    from .calibration import expected_calibration_error, fit_temperature, reliability_diagram, temperature_nll
    from .inference import predict_files
    from .submit import load_any_model
    results = list(predict_files(load_any_model(weights), [p for p, _ in items], batch_size=32))
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
    from .submit import load_any_model
    try:
        load_any_model(staged)
    except (ValueError, OSError) as err:
        reason = str(err).replace(str(staged.parent) + os.sep, '')
        raise RunFolderError(f'{run_dir}: the exported file would be refused by submit\'s loader ({reason}); nothing '
                             f'was written: {EXPORT_TODO}') from None


def delivered_family(config: RunConfig, run_dir: Path) -> Family:
    """The run's family, which must ship (`export.py` names the output after its `delivery`): `RunFolderError`
    for a family that is unknown or not delivered (a teacher)."""
    try:
        family = get_family(config.family)
    except ValueError as err:
        raise RunFolderError(f'{Path(run_dir) / "config.json"}: {err}: {EXPORT_TODO}') from None
    if family.delivery is None:
        raise RunFolderError(f'{run_dir}: the {family.name} family is not delivered (only {", ".join(DELIVERIES)} '
                             f'are): {EXPORT_TODO}')
    return family


def export_run(run_dir: str | Path, out: str | Path, half: bool = False, calibrated: bool = True) -> Path:
    """Write `run_dir`'s models/best.pth (a seeds experiment: its best seed's) as a raw state_dict at `out`
    (fp16 with `half`), plus `out`.json.

    The weights are first loaded into the network `submit` builds, every key checked, so that an export
    that `submit` could not load fails here and not on the user's machine. With `calibrated`, a temperature
    is fitted on the run's validation photos (see `calibrate`) and stored in the sidecar as `temperature`
    (with the calibration numbers under `calibration`); `submit.predict_proba` divides the logits by it.
    """
    run_dir, out = resolve_run(run_dir), Path(out)
    config = read_run_config(run_dir)
    best = run_dir / 'models' / 'best.pth'
    state = load_weights(best, EXPORT_TODO)   # weights_only: a crafted pickle is refused, nothing runs
    family = delivered_family(config, run_dir)

    try:   # a config that does not fit the weights or the network: one sentence, not a traceback
        pp = config.preprocessing
        model = family.trained_network(config, state, str(best))
        settings = {'family': family.name, **family.delivery.sidecar_fields(config, model), 'image_size': pp.size,
                    'crop_pct': pp.crop_pct, 'mean': list(pp.mean), 'std': list(pp.std),
                    'classes': list(config.classes)}
    except ArchitectureError as err:
        raise RunFolderError(f'{err}: {EXPORT_TODO}') from None
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise RunFolderError(f'{run_dir / "config.json"} does not describe a model export can build '
                             f'({type(err).__name__}: {err}): {EXPORT_TODO}') from None
    try:   # the sidecar's own checks are the loader's: a field it would refuse stops the export here
        sidecar = Sidecar.from_dict(settings, 'the sidecar')
    except ValueError as err:
        raise RunFolderError(f'{run_dir}: the exported file would be refused by submit\'s loader ({err}); nothing '
                             f'was written: {EXPORT_TODO}') from None
    state_dict = model.state_dict()   # the published key order: the family's network loaded, LoRA folded in
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}

    metrics_path = run_dir / 'metrics.json'
    metrics = read_json(metrics_path, EXPORT_TODO) if metrics_path.is_file() else {}
    accuracy = metrics.get('valid_accuracy')
    sidecar = sidecar.updated(dtype='float16' if half else 'float32', run=run_dir.name,
                              exported=date.today().isoformat(),
                              valid_accuracy=float(accuracy) if isinstance(accuracy, (int, float))
                              and math.isfinite(accuracy) else None)

    # Both files are written and calibrated in a private folder beside `out`, then renamed over the old ones:
    # a file being served (the demo) keeps its old content until the rename, and a failure anywhere (disk
    # full, an interrupted export) leaves the old pair as it was and no temporary file behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp'))
    try:
        staged = staging / out.name
        torch.save(state_dict, staged)
        sidecar.write(staged)
        _as_submit_reads_it(staged, run_dir)   # before calibrating: a refused file is no photo's fault
        if calibrated:
            try:
                report = calibrate(staged, validation_items(run_dir), run_dir)
            except (OSError, ValueError, KeyError, csv.Error) as err:   # e.g. a machine without the training photos
                print(f'warning: {out.name} is not calibrated (temperature 1.0): its validation photos cannot be '
                      f'read ({err}); export with the data present, or pass --no-calibrate to silence this')
            else:
                sidecar = sidecar.updated(temperature=report['temperature'], calibration=report)
                sidecar.write(staged)
        _as_submit_reads_it(staged, run_dir)   # the pair exactly as it will be renamed into place
        for path in (staged, Sidecar.path_for(staged)):
            with path.open('rb') as f:
                os.fsync(f.fileno())
        os.replace(staged, out)
        os.replace(Sidecar.path_for(staged), Sidecar.path_for(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
