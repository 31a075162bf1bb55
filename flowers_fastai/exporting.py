"""A run's best weights -> the raw state_dict file (+ JSON sidecar) that `submit` loads."""
from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import torch

from .architectures import ClipClassifier, ClipTowerSpec, build_cnn, load_exactly
from .lora import apply_lora, has_lora, merge_lora

FAMILIES = ('cnn', 'vit')


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


def export_run(run_dir: str | Path, out: str | Path, half: bool = False) -> Path:
    """Write `run_dir`'s models/best.pth (a seeds experiment: its best seed's) as a raw state_dict at `out`
    (fp16 with `half`), plus `out`.json.

    The weights are first loaded into the network `submit` builds, every key checked, so that an export
    that `submit` could not load fails here and not on the user's machine.
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
    return out
