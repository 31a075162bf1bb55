"""Two exported CNN files, each loaded as a grader loads it (the `.pth` alone, no sidecar), on the same validation
photos of a run: both accuracies, the photos only one of them gets right, and McNemar's exact test on those; for
a run on several data folders, also per folder (the first folder's photos are those of every earlier result).

    python scripts/paired_compare.py --run runs/kd-long-teacher --weights new/cnn_flowers.pth old/cnn_flowers.pth

Paired on the same photos, the comparison is sharper than two accuracies with their own standard errors: only the
photos the files disagree on carry information (McNemar). Still one split: read it as evidence, not a ranking.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowers_fastai.data_files import folder_names, folder_of  # noqa: E402
from flowers_fastai.exporting import validation_items  # noqa: E402
from flowers_fastai.run_folder import read_run_config  # noqa: E402
from flowers_fastai.inference import predict_files  # noqa: E402
from flowers_fastai.submit import load_cnn_model  # noqa: E402


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: under "equally good", the b + c discordant photos split as a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def discordant(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """(photos right only with A, photos right only with B): the counts McNemar's test reads."""
    return sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))


def comparison(name: str, a: list[bool], b: list[bool]) -> str:
    """One line: the photos compared, each file's accuracy, the discordant counts and McNemar's p."""
    only_a, only_b = discordant(a, b)
    return (f'{name}: {len(a)} photos, accuracy A {sum(a) / len(a):.4f} ({sum(a)}), B {sum(b) / len(b):.4f} '
            f'({sum(b)}); right only with A: {only_a}, only with B: {only_b}; McNemar exact p = '
            f'{mcnemar_exact(only_a, only_b):.3g}')


def correct_alone(weights: Path, valid: list[tuple[Path, str]]) -> list[bool]:
    with tempfile.TemporaryDirectory() as tmp:   # a copy without its sidecar: what a grader loads
        copy = Path(tmp) / 'cnn_flowers.pth'
        shutil.copy(weights, copy)
        results = predict_files(load_cnn_model(copy), [path for path, _ in valid], batch_size=32)
        return [r.label == label for r, (_, label) in zip(results, valid)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', type=Path, required=True, help='run folder whose validation split is scored')
    parser.add_argument('--weights', type=Path, nargs=2, required=True, metavar=('A', 'B'), help='two CNN files')
    args = parser.parse_args(argv)
    config = read_run_config(args.run)
    valid = validation_items(args.run)   # the run's valid_items.csv (older runs: the split rebuilt)
    a, b = (correct_alone(w, valid) for w in args.weights)
    print(f'{len(valid)} validation photos of {args.run}, each file alone (no sidecar); A = {args.weights[0]}, '
          f'B = {args.weights[1]}')
    print(comparison('all', a, b))
    if len(config.data) > 1:
        source = [folder_of(path, list(config.data)) for path, _ in valid]
        for k, name in enumerate(folder_names(list(config.data))):
            keep = [i for i, s in enumerate(source) if s == k]
            print(comparison(name, [a[i] for i in keep], [b[i] for i in keep]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
