"""A run's best weights -> the raw state_dict file (+ JSON sidecar) that `submit` loads, calibrated on the run's
validation split (temperature scaling, stored in the sidecar)."""
from __future__ import annotations

import csv
import json
from datetime import date
from pathlib import Path

import torch

from .architectures import ClipClassifier, ClipTowerSpec, build_cnn, load_exactly
from .labels import CLASSES
from .lora import apply_lora, has_lora, merge_lora

FAMILIES = ('cnn', 'vit')
VALID_ITEMS = 'valid_items.csv'   # the run's validation photos (path, label), written by training


def resolve_run(run_dir: Path) -> Path:
    """A run folder as is; a seeds experiment (summary.json, see experiments.py) as its global best seed."""
    summary = Path(run_dir) / 'summary.json'
    return Path(run_dir) / json.loads(summary.read_text())['best_run'] if summary.is_file() else Path(run_dir)


def run_config(run_dir: Path) -> dict:
    config_path = resolve_run(run_dir) / 'config.json'
    if not config_path.is_file():
        raise FileNotFoundError(f'{run_dir} is not a training run folder (no config.json)')
    return json.loads(config_path.read_text())


def latest_run(runs_dir: Path, family: str) -> Path | None:
    """The most recently finished run or seeds experiment of `family` under `runs_dir`."""
    finished = {p.parent: p.stat().st_mtime for pattern in ('*/metrics.json', '*/summary.json')
                for p in Path(runs_dir).glob(pattern)}
    finished = {run: t for run, t in finished.items() if run_config(run)['recipe']['family'] == family}
    return max(finished, key=finished.get, default=None)


def rebuild_split(config: dict):
    """The run's photos and its split, rebuilt from config.json the way training made them: (items,
    train_idx, valid_idx, audit). For runs that predate `valid_items.csv`, and for leak checks."""
    from .audit import audit_items
    from .data import grouped_stratified_split, scan_image_folder, stratified_split
    recipe, split = config['recipe'], config.get('split', 'stratified')
    items = scan_image_folder(config['data']).items
    audit = audit_items(items)
    if split == 'grouped':
        kept = audit.kept()
        labels = [items[i][1] for i in kept]
        train_idx, valid_idx = grouped_stratified_split(labels, audit.group[kept], recipe['valid_pct'], recipe['seed'])
        train_idx, valid_idx = [kept[i] for i in train_idx], [kept[i] for i in valid_idx]
    else:
        train_idx, valid_idx = stratified_split([label for _, label in items], recipe['valid_pct'], recipe['seed'])
    return items, train_idx, valid_idx, audit


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
    recipe, pp = config['recipe'], config['preprocessing']
    best = run_dir / 'models' / 'best.pth'
    if not best.is_file():
        raise FileNotFoundError(f'{best} does not exist: the run has not finished an epoch yet')
    state = torch.load(best, map_location='cpu', weights_only=True)
    state = state.get('model', state)  # fastai's `save(with_opt=True)` nests the weights under 'model'

    if recipe['family'] == 'cnn':
        model = build_cnn(recipe['arch'])
        key_order = list(model.state_dict())
        sidecar = {'family': 'cnn', 'arch': recipe['arch'].split('.')[0]}
    else:
        spec = ClipTowerSpec(**config['clip_spec'])
        model = ClipClassifier(spec)
        key_order = list(model.state_dict())
        if has_lora(state):  # LoRA updates (a best epoch before any light full fine-tune): load, then fold in
            apply_lora(model.visual, recipe['lora_rank'], recipe.get('lora_alpha', 16.0))
        sidecar = {'family': 'vit', 'arch': spec.name, 'quick_gelu': spec.quick_gelu, 'head_width': spec.head_width}
    load_exactly(model, state, str(best))
    merged = merge_lora(model).state_dict()
    state_dict = {k: merged[k] for k in key_order}  # the published key order, whatever LoRA did
    if half:
        state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}

    metrics_path = run_dir / 'metrics.json'
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    sidecar.update(image_size=pp['size'], crop_pct=pp['crop_pct'], mean=pp['mean'], std=pp['std'],
                   classes=config['classes'], dtype='float16' if half else 'float32',
                   run=run_dir.name, valid_accuracy=metrics.get('valid_accuracy'), exported=date.today().isoformat())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out)
    out.with_suffix('.json').write_text(json.dumps(sidecar, indent=2) + '\n')
    if calibrated:
        try:
            report = calibrate(out, validation_items(run_dir), run_dir)
        except (OSError, ValueError) as err:   # e.g. exported on a machine without the training photos
            print(f'warning: {out.name} is not calibrated (temperature 1.0): its validation photos cannot be '
                  f'read ({err}); export with the data present, or pass --no-calibrate to silence this')
        else:
            sidecar.update(temperature=report['temperature'], calibration=report)
            out.with_suffix('.json').write_text(json.dumps(sidecar, indent=2) + '\n')
    return out
