"""The seeds protocol: one full training per seed, then one summary with mean and spread.

    runs/<name>/seed0/ seed1/ ...   each a complete run folder (see training.train)
    runs/<name>/summary.md          best validation accuracy per seed, mean +/- std, per-class accuracy
    runs/<name>/summary.json        the same as data, and `best_run`: the global best seed (what export.py takes)
    runs/<name>/curves.png          validation accuracy and losses per epoch, every seed
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .run_folder import read_json, read_run_config, write_json
from .labels import CLASSES
from .recipes import Recipe
from .training import resume_point_path, train


def run_seeds(recipe: Recipe, data_dir, exp_dir, seeds: list[int], pretrained=True, resume: bool = False,
              **train_kwargs) -> dict:
    """Train `recipe` once per seed (seeding Python, NumPy, PyTorch and the split) under `exp_dir`/seed<k>.
    With `resume`, finished seeds are kept, an interrupted one continues from its last epoch."""
    exp_dir = Path(exp_dir)
    for seed in seeds:
        run_dir = exp_dir / f'seed{seed}'
        if (run_dir / 'metrics.json').exists():
            if not resume:
                raise FileExistsError(f'{run_dir} is finished already: pass --resume to keep it, or another --name')
            print(f'{run_dir}: finished, kept')
            continue
        print(f'=== seed {seed}: {run_dir}')
        train(replace(recipe, seed=seed), data_dir, run_dir, pretrained=pretrained,
              resume=resume and resume_point_path(run_dir).exists(), **train_kwargs)
    return summarize(exp_dir)


def summarize(exp_dir) -> dict:
    """summary.md / summary.json / curves.png over the finished seed runs of `exp_dir`."""
    exp_dir = Path(exp_dir)
    runs = sorted((p.parent for p in exp_dir.glob('seed*/metrics.json')), key=lambda p: int(p.name[4:]))
    if not runs:
        raise FileNotFoundError(f'no finished seed run under {exp_dir}')
    todo = 'train that seed again (delete its folder, then --resume the experiment)'
    metrics = {run.name: read_json(run / 'metrics.json', todo) for run in runs}
    accuracies = np.array([m.get('valid_accuracy') for m in metrics.values()], dtype=float)   # null -> NaN
    if not np.isfinite(accuracies).all():
        bad = [name for name, a in zip(metrics, accuracies) if not np.isfinite(a)]
        raise ValueError(f'{exp_dir}: {", ".join(bad)} recorded no validation accuracy: {todo}')
    best = runs[int(np.argmax(accuracies))]
    config = read_run_config(runs[0], todo)
    summary = {'recipe': asdict(config.recipe), 'split': config.split, 'seeds': [r.name for r in runs],
               'valid_accuracy': dict(zip(metrics, accuracies.tolist())),
               'mean': float(accuracies.mean()), 'std': float(accuracies.std(ddof=1)) if len(runs) > 1 else 0.0,
               'per_class_mean': {c: _mean([m['per_class_accuracy'].get(c) for m in metrics.values()])
                                  for c in CLASSES},
               'best_run': best.name}
    write_json(exp_dir / 'summary.json', summary)   # strict JSON, atomic: export.py reads it

    lines = [f'# {exp_dir.name}: {config.family} {config.recipe.arch}, {len(runs)} seeds', '',
             f'Best validation accuracy: **{summary["mean"]:.4f} +/- {summary["std"]:.4f}** (mean +/- sample std '
             f'over seeds; {config.split} split, {config.n_valid} validation photos per seed).',
             f'Global best: `{best.name}` ({accuracies.max():.4f}).', '',
             '| seed | best val. accuracy | ' + ' | '.join(CLASSES) + ' |', '|---' * (len(CLASSES) + 2) + '|']
    for name, m in metrics.items():
        mark = ' (best)' if name == best.name else ''
        lines.append(f'| {name}{mark} | {m["valid_accuracy"]:.4f} | '
                     + ' | '.join(_cell(m['per_class_accuracy'].get(c)) for c in CLASSES) + ' |')
    lines += ['| mean | ' + f'{summary["mean"]:.4f} | '
              + ' | '.join(_cell(summary['per_class_mean'][c]) for c in CLASSES) + ' |', '',
              'Per-seed confusion matrices: `seed*/confusion_matrix.png`; curves: `curves.png`.', '']
    (exp_dir / 'summary.md').write_text('\n'.join(lines))
    _plot_curves(runs, exp_dir / 'curves.png')
    return summary


def _mean(values) -> float | None:
    """Mean over the seeds that have a value (a class with no validation photo has none: null in metrics.json)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _cell(value) -> str:
    return '-' if value is None else f'{value:.3f}'


def _plot_curves(runs: list[Path], out: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        history = pd.read_csv(run / 'history.csv')
        step = np.arange(len(history))   # epochs of all phases, in order
        acc_ax.plot(step, history['accuracy'], label=run.name)
        loss_ax.plot(step, history['train_loss'], label=f'{run.name} train')
        loss_ax.plot(step, history['valid_loss'], '--', label=f'{run.name} valid')
    acc_ax.set(xlabel='epoch', ylabel='validation accuracy', title='validation accuracy')
    loss_ax.set(xlabel='epoch', ylabel='loss', title='losses')
    acc_ax.legend()
    loss_ax.legend(fontsize='small')
    fig.savefig(out, dpi=100, bbox_inches='tight')
    plt.close(fig)
