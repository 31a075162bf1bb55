"""Which distillation targets teach a from-scratch student fastest on this CPU: a short schedule, several arms,
several seeds, all on the teacher's split, so that the long runs use the target measured to teach best.

    python scripts/distill_arms.py --teacher runs/kd-teacher-lite0-160 --runs runs/arms --seeds 0 1 2

Every arm trains `train.py cnn` from scratch with the same schedule (`SCHEDULE`) on the split the teacher was
trained on (`--split-seed`, so that no photo the teacher learnt from is in a student's validation); only the
distillation options differ (`ARMS`). Runs go seed by seed (every arm of seed 0 first), so an interrupted sweep
still holds whole seeds; rerunning the command skips finished runs and resumes an interrupted one. At the end
(or with `--summary-only`) it prints and writes `<runs>/arms.md`: each arm's validation accuracy per seed, mean
and std, and its mean paired difference with the arm without teacher.
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

# The short schedule: small photos, few epochs (`--epochs`), a short EMA (about one epoch of steps), the recipe's mixing
# and augmentation; the teacher sees the student's crops at 128 px.
SCHEDULE = ['--arch', 'convnextv2_atto', '--no-pretrained', '--size', '96', '--ema-decay', '0.99',
            '--split', 'stratified']
ARMS = {
    'no-teacher': [],
    'logits': ['--distill-alpha', '0.5'],                                   # the defaults: alpha 0.5, T 1
    'logits-only-kd': ['--distill-alpha', '1.0'],                           # Beyer et al.: teacher only, no labels
    'logits+features': ['--distill-alpha', '0.5', '--distill-features', '1.0'],
    'logits-T4': ['--distill-alpha', '0.5', '--distill-temperature', '4.0'],   # softer targets: more dark knowledge
}


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f'{arm}-seed{seed}'


def train(args, arm: str, seed: int) -> None:
    folder = run_dir(args.runs, arm, seed)
    if (folder / 'metrics.json').exists():
        return
    cmd = [sys.executable, str(ROOT / 'train.py'), 'cnn', '--data', *map(str, args.data), '--runs', str(args.runs),
           '--name', folder.name]
    if (folder / 'config.json').exists():
        cmd.append('--resume')   # the recipe, data and split come from its config.json
    else:
        cmd += [*SCHEDULE, '--epochs', str(args.epochs), '--seed', str(seed), '--split-seed', str(args.split_seed),
                *ARMS[arm]]
        if arm != 'no-teacher':
            cmd += ['--teacher', str(args.teacher), '--teacher-size', str(args.teacher_size)]
    print('$', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def summary(args) -> str:
    accs = {arm: {} for arm in args.arms}
    for arm in args.arms:
        for seed in args.seeds:
            metrics = run_dir(args.runs, arm, seed) / 'metrics.json'
            if metrics.exists():
                accs[arm][seed] = json.loads(metrics.read_text())['valid_accuracy']
    lines = ['| arm | ' + ' | '.join(f'seed {s}' for s in args.seeds) + ' | mean | std | paired diff. vs no-teacher |',
             '|---|' + '---|' * (len(args.seeds) + 3)]
    base = accs.get('no-teacher', {})
    for arm, by_seed in accs.items():
        cells = [f'{by_seed[s]:.4f}' if s in by_seed else '-' for s in args.seeds]
        values = list(by_seed.values())
        mean = f'{statistics.mean(values):.4f}' if values else '-'
        std = f'{statistics.stdev(values):.4f}' if len(values) > 1 else '-'
        diffs = [by_seed[s] - base[s] for s in by_seed if s in base]
        diff = (f'{statistics.mean(diffs):+.4f} (n={len(diffs)})' if diffs and arm != 'no-teacher' else '')
        lines.append(f'| {arm} | ' + ' | '.join(cells) + f' | {mean} | {std} | {diff} |')
    # how fast each arm learns: validation accuracy after each epoch, mean over the seeds finished
    curves = {arm: [] for arm in accs}
    for arm in accs:
        for seed in accs[arm]:
            with open(run_dir(args.runs, arm, seed) / 'history.csv', newline='') as history:
                curves[arm].append([float(row['accuracy']) for row in csv.DictReader(history)])
    n_epochs = max((len(c) for runs in curves.values() for c in runs), default=0)
    lines += ['', '| arm (mean over seeds) | ' + ' | '.join(f'epoch {e}' for e in range(n_epochs)) + ' |',
              '|---|' + '---|' * n_epochs]
    for arm, runs in curves.items():
        cells = [f'{statistics.mean(c[e] for c in runs if len(c) > e):.4f}' if any(len(c) > e for c in runs)
                 else '-' for e in range(n_epochs)]
        lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teacher', type=Path, required=True, help='teacher run folder (train.py teacher)')
    parser.add_argument('--teacher-size', type=int, default=128, help='teacher input size (default: %(default)s)')
    parser.add_argument('--data', type=Path, nargs='+', default=[ROOT.parent / 'shared' / 'data' / 'flowers'])
    parser.add_argument('--runs', type=Path, default=ROOT / 'runs' / 'arms')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--split-seed', type=int, default=0, help="the teacher's split seed (default: %(default)s)")
    parser.add_argument('--epochs', type=int, default=4, help='epochs of every run (default: %(default)s)')
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(ARMS))
    parser.add_argument('--summary-only', action='store_true')
    args = parser.parse_args(argv)
    args.runs, args.teacher = args.runs.resolve(), args.teacher.resolve()
    args.data = [d.resolve() for d in args.data]
    if not args.summary_only:
        for seed in args.seeds:
            for arm in args.arms:
                train(args, arm, seed)
    return write_table(args.runs, summary(args))


def write_table(runs: Path, table: str) -> int:
    """<runs>/arms.md, and the same table on stdout."""
    runs.mkdir(parents=True, exist_ok=True)
    (runs / 'arms.md').write_text(table + '\n')
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
