"""What more photos and a stronger teacher each bring to a from-scratch student: arms at equal optimizer steps,
several seeds, every student validated on the same photos of the first folder.

    python scripts/data_arms.py --runs /work/runs/arms20 --epochs 24 --seeds 0 1 2 \
        --teachers /work/runs/teacher-lite0-160 /work/runs/teacher-lite1-160 /work/runs/teacher-lite2-160

Arms (`ARMS`): `one-folder` (the first folder alone, no teacher) against `two-folders` (both, no teacher) at
equal steps: the one-folder arm trains `--epochs` x (photos of both) / (photos of the first) epochs, so that
both see as many batches; then, on both folders, `lite0` (the first teacher) and `ensemble` (all teachers,
their averaged probabilities). Every run is `train.py cnn` from scratch with `SCHEDULE` on the teachers' split
(`--split-seed`), photos in memory (`--cache-size`). Seed by seed, every arm of a seed first; a rerun skips
finished runs and resumes an interrupted one. Writes `<runs>/arms.md`: validation accuracy on the first folder's
photos (comparable with every earlier result), on the second's, and overall, per seed, mean and std; then the
first folder's accuracy at equal steps, read from each run's history.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'scripts')]
DATA = ROOT.parent / 'shared' / 'data'

from distill_arms import run_dir, write_table  # noqa: E402
from flowers_fastai.run_folder import read_run_config  # noqa: E402

SCHEDULE = ['--arch', 'convnextv2_atto', '--no-pretrained', '--size', '112', '--ema-decay', '0.99',
            '--split', 'stratified', '--cache-size', '160']
ARMS = {'one-folder': dict(folders=1, teachers=0), 'two-folders': dict(folders=2, teachers=0),
        'lite0': dict(folders=2, teachers=1), 'ensemble': dict(folders=2, teachers=None)}   # None: all


def equal_step_epochs(epochs: int, photos_both: int, photos_first: int) -> int:
    """Epochs of the first folder alone that take as many optimizer steps as `epochs` on both folders."""
    return max(1, round(epochs * photos_both / photos_first))


def command(args, arm: str, seed: int, photos: dict[int, int]) -> list[str]:
    folder = run_dir(args.runs, arm, seed)
    cmd = [sys.executable, str(ROOT / 'train.py'), 'cnn', '--runs', str(args.runs), '--name', folder.name]
    if (folder / 'config.json').exists():
        return cmd + ['--resume']   # the recipe, data and split come from its config.json
    spec = ARMS[arm]
    epochs = args.epochs if spec['folders'] == 2 else equal_step_epochs(args.epochs, photos[2], photos[1])
    cmd += ['--data', *map(str, args.data[:spec['folders']]), *SCHEDULE, '--epochs', str(epochs),
            '--seed', str(seed), '--split-seed', str(args.split_seed)]
    teachers = args.teachers if spec['teachers'] is None else args.teachers[:spec['teachers']]
    if teachers:
        cmd += ['--teacher', *map(str, teachers), '--teacher-size', str(args.teacher_size)]
    return cmd


def training_photos(data: list[Path], split_seed: int) -> dict[int, int]:
    """Training photos of the first folder, and of both: what equal steps are counted in."""
    from flowers_fastai.data import split_photos
    both = split_photos(data, 'stratified', 0.2, split_seed)
    first = both.frame[(both.frame.source == 0) & ~both.frame.is_valid]
    return {1: len(first), 2: int((~both.frame.is_valid).sum())}


def summary(args) -> str:
    names = [Path(d).name for d in args.data]
    lines = ['| arm | ' + ' | '.join(f'{n}, seed {s}' for n in names[:1] for s in args.seeds)
             + f' | {names[0]}: mean +/- std | {names[1]}: mean +/- std | all: mean +/- std |',
             '|---|' + '---|' * (len(args.seeds) + 3)]
    for arm in args.arms:
        by_seed = {}
        for seed in args.seeds:
            metrics = run_dir(args.runs, arm, seed) / 'metrics.json'
            if metrics.exists():
                by_seed[seed] = json.loads(metrics.read_text())
        first = {s: m.get('valid_accuracy_by_folder', {}).get(names[0], m['valid_accuracy']) for s, m in by_seed.items()}
        second = [m['valid_accuracy_by_folder'][names[1]] for m in by_seed.values() if 'valid_accuracy_by_folder' in m]
        overall = [m['valid_accuracy'] for m in by_seed.values() if 'valid_accuracy_by_folder' in m]

        def spread(values):
            if not values:
                return '-'
            return f'{statistics.mean(values):.4f} +/- {statistics.stdev(values):.4f}' if len(values) > 1 \
                else f'{values[0]:.4f}'
        cells = [f'{first[s]:.4f}' if s in first else '-' for s in args.seeds]
        lines.append(f'| {arm} | ' + ' | '.join(cells) + f' | {spread(list(first.values()))} | {spread(second)} | '
                     f'{spread(overall)} |')
    return '\n'.join(lines)


def equal_steps(args, photos: dict[int, int], checkpoints: int = 4) -> str:
    """The first folder's validation accuracy, per seed, at `checkpoints` evenly spaced epochs of the two-folder
    schedule, each arm read from its history.csv at as many optimizer steps: for `one-folder`, its last epoch at
    or below them (steps per epoch = training photos // the run's batch size, as the loader drops the last
    partial batch)."""
    first = f'accuracy_{Path(args.data[0]).name}'
    folders = {(arm, seed): run_dir(args.runs, arm, seed) for arm in args.arms for seed in args.seeds}
    finished = {key: folder for key, folder in folders.items() if (folder / 'metrics.json').exists()}
    # one batch size for every run, or a row's step count would fit some of its cells and not others
    batch_sizes = {folder: read_run_config(folder, 'rerun the arm').recipe.bs for folder in finished.values()}
    if len(set(batch_sizes.values())) > 1:
        sizes = ', '.join(f'{folder.name}: {bs}' for folder, bs in batch_sizes.items())
        raise SystemExit(f'the arms trained with different batch sizes, so no step count fits a row: {sizes}')
    histories = {}   # each run's history.csv, read once for all the rows
    for folder in finished.values():
        with open(folder / 'history.csv', newline='') as f:
            histories[folder] = list(csv.DictReader(f))
    header = ['| steps | seed | ' + ' | '.join(args.arms) + ' |', '|---|---|' + '---|' * len(args.arms)]
    rows = []
    for k in range(1, checkpoints + 1):
        for seed in args.seeds:
            cells, steps = [], None
            for arm in args.arms:
                folder = finished.get((arm, seed))
                if folder is None:
                    cells.append('-')
                    continue
                bs = batch_sizes[folder]
                steps = args.epochs * k // checkpoints * (photos[2] // bs)
                row = histories[folder][steps // (photos[ARMS[arm]['folders']] // bs) - 1]
                cells.append(f"{float(row.get(first, row['accuracy'])):.4f}")
            if steps is not None:
                rows.append(f'| {steps:,} | {seed} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(header + rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teachers', type=Path, nargs='+', default=[], help='teacher run folders, Lite0 first')
    parser.add_argument('--teacher-size', type=int, default=128)
    parser.add_argument('--data', type=Path, nargs=2, default=[DATA / 'flowers', DATA / 'flowers-flickr'])
    parser.add_argument('--runs', type=Path, required=True)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--split-seed', type=int, default=0, help="the teachers' split seed (default: %(default)s)")
    parser.add_argument('--epochs', type=int, default=24, help='epochs on both folders (default: %(default)s)')
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(ARMS))
    parser.add_argument('--summary-only', action='store_true')
    args = parser.parse_args(argv)
    args.runs, args.data = args.runs.resolve(), [d.resolve() for d in args.data]
    args.teachers = [t.resolve() for t in args.teachers]
    if any(ARMS[arm]['teachers'] != 0 for arm in args.arms) and not args.teachers and not args.summary_only:
        parser.error('the lite0 and ensemble arms need --teachers (or leave them out with --arms)')
    photos = training_photos(args.data, args.split_seed)
    if not args.summary_only:
        for seed in args.seeds:
            for arm in args.arms:
                if not (run_dir(args.runs, arm, seed) / 'metrics.json').exists():
                    cmd = command(args, arm, seed, photos)
                    print('$', ' '.join(cmd), flush=True)
                    subprocess.run(cmd, check=True, cwd=ROOT)
    return write_table(args.runs, summary(args) + "\n\nThe first folder's accuracy at equal steps:\n\n"
                       + equal_steps(args, photos))


if __name__ == '__main__':
    sys.exit(main())
