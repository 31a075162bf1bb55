"""Re-score a run's validation split with exported weights, also without leaked duplicates.

    python scripts/validation_report.py --run runs/shipped-cnn-atto128 --weights weights/cnn_flowers.pth

Rebuilds the run's split from its config.json (data, split, seed, valid_pct), classifies every validation photo
through `flowers_fastai.submit` (so the exported file, not the training process, is measured), and prints:
- accuracy on the whole validation split (equals the run's metrics.json when export and preprocessing agree);
- accuracy on the validation photos with no copy in the training split and not filed under two classes (the
  audit's duplicate groups): what a run trained on a plain stratified split really generalises to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowers_fastai.exporting import rebuild_split  # noqa: E402
from flowers_fastai.labels import CLASSES  # noqa: E402
from flowers_fastai.run_folder import read_run_config  # noqa: E402
from flowers_fastai.submit import loader_for, predict  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', type=Path, required=True, help='run folder (its config.json gives the split)')
    parser.add_argument('--weights', type=Path, required=True, help='exported weights file of that run')
    args = parser.parse_args(argv)

    config = read_run_config(args.run)
    split = config.split
    items, train_idx, valid_idx, audit = rebuild_split(config)

    model = loader_for(config.family)(args.weights)
    trained_groups = {audit.group[i] for i in train_idx}
    in_conflict = {i for g in audit.conflicts() for i in g}
    correct, leak_free = {}, []
    for n, i in enumerate(valid_idx, 1):
        path, label = items[i]
        correct[i] = predict(model, path) == label
        if audit.group[i] not in trained_groups and i not in in_conflict:
            leak_free.append(i)
        print(f'\r{n}/{len(valid_idx)}', end='', file=sys.stderr)
    print(file=sys.stderr)

    def accuracy(idx):
        return sum(correct[i] for i in idx) / len(idx)
    split_seed = config.recipe.data_split_seed
    print(f'run {args.run.name} ({split} split, split seed {split_seed}), weights {args.weights}')
    print(f'validation photos: {len(valid_idx)}, accuracy {accuracy(valid_idx):.4f}')
    print(f'without leaked copies or photos filed under two classes: {len(leak_free)}, '
          f'accuracy {accuracy(leak_free):.4f}')
    for c in CLASSES:
        idx = [i for i in leak_free if items[i][1] == c]
        print(f'  {c:10s} {len(idx):4d} photos, accuracy {accuracy(idx):.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
