"""Teachers and their ensemble on their validation photos, per data folder, at several input sizes.

    python scripts/teachers_report.py --teachers runs/teacher-lite0-160 runs/teacher-lite1-160 ... --sizes 112 128

Each teacher is a run folder of `train.py teacher` (all trained on one split: the script refuses teachers whose
validation photos differ). Every teacher is scored at its own training size and at each `--sizes` (the sizes a
student batch may reach it at, `--teacher-size`), on the eval crop (resize the shorter side, center crop, the
teacher's own normalisation); the ensemble averages the teachers' probabilities, as distillation does (T = 1).
Prints a Markdown table: accuracy overall and per folder.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowers_fastai.data import data_folders  # noqa: E402
from flowers_fastai.data_files import folder_names, folder_of  # noqa: E402
from flowers_fastai.exporting import validation_items  # noqa: E402
from flowers_fastai.run_folder import read_run_config  # noqa: E402
from flowers_fastai.labels import CLASSES  # noqa: E402
from flowers_fastai.preprocess import Preprocessing, load_for_model  # noqa: E402
from flowers_fastai.distill import load_teacher  # noqa: E402


def probabilities(model, paths: list[Path], pp: Preprocessing, batch_size: int = 64) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = torch.cat([load_for_model(p, pp) for p in paths[i:i + batch_size]])
            out.append(model(batch).softmax(-1))
    return torch.cat(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--teachers', type=Path, nargs='+', required=True, help='teacher run folders')
    parser.add_argument('--sizes', type=int, nargs='*', default=[128], help='student sizes to score them at too')
    args = parser.parse_args(argv)
    valid = validation_items(args.teachers[0])
    for run in args.teachers[1:]:
        if validation_items(run) != valid:
            sys.exit(f'error: {run} was validated on other photos than {args.teachers[0]}: train the teachers on '
                     'one split (--split, --split-seed, --data) to compare or ensemble them')
    folders = data_folders(list(read_run_config(args.teachers[0]).data))
    names = folder_names(folders)
    source = np.array([folder_of(p, folders) for p, _ in valid])
    targets = torch.tensor([CLASSES.index(label) for _, label in valid])
    paths = [Path(p) for p, _ in valid]

    def row(name: str, probs: torch.Tensor) -> str:
        right = (probs.argmax(-1) == targets).numpy()
        cells = [f'{right.mean():.4f}'] + [f'{right[source == k].mean():.4f}' for k in range(len(folders))]
        return f'| {name} | ' + ' | '.join(cells) + ' |'

    print(f'{len(valid)} validation photos: ' + ', '.join(f'{n} {int((source == k).sum())}'
                                                           for k, n in enumerate(names)))
    print('| teacher, input size | all | ' + ' | '.join(names) + ' |')
    print('|---|---|' + '---|' * len(names))
    by_size: dict[str, list[torch.Tensor]] = {}
    for run in args.teachers:
        model, pp = load_teacher(run)
        own = read_run_config(run).preprocessing
        for size in dict.fromkeys([own.size, *args.sizes]):
            probs = probabilities(model, paths, replace(own, size=size))
            key = 'own size' if size == own.size else f'{size} px'
            by_size.setdefault(key, []).append(probs)
            print(row(f'{run.name}, {size} px{" (own)" if size == own.size else ""}', probs), flush=True)
    if len(args.teachers) > 1:
        for key, members in by_size.items():
            if len(members) == len(args.teachers):
                print(row(f'ensemble of {len(members)}, {key}', torch.stack(members).mean(0)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
