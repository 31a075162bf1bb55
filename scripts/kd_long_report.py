"""The table of the long-schedule distillation comparison (`scripts/kd_long_seeds.sh`): each student exported and scored
as a grader loads it (the `.pth` alone, no sidecar), on the validation photos every run shares (the teacher's split),
paired by seed (with against without the teacher, McNemar), and the teacher alone.

    python scripts/kd_long_report.py --runs runs/long --seeds 1 2

Each student run is exported once to `<run>/exported/cnn_flowers.pth` (calibrated on its validation photos, as
export.py does); a later call reuses it. `--soup` adds the uniform average of the students with the teacher (same
starting point, same recipe: Wortsman et al. 2022, "Model soups"), scored the same way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowers_fastai.exporting import export_run, validation_items  # noqa: E402
from flowers_fastai.weights_io import read_torch_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_compare import correct_alone, discordant, mcnemar_exact  # noqa: E402

ARMS = {'teacher': 'kd-long-teacher-seed{}', 'noteacher': 'kd-long-noteacher-seed{}',
        'teacher alone': 'kd-teacher-lite0-160-seed{}'}


def exported(run: Path) -> Path:
    out = run / 'exported' / 'cnn_flowers.pth'
    if not out.is_file():
        export_run(run, out)
    return out


def soup(files: list[Path], out: Path) -> Path:
    """The uniform average of state_dicts of one network (floating tensors averaged in fp32, the rest kept)."""
    states = [read_torch_file(f) for f in files]
    if any(s.keys() != states[0].keys() for s in states):
        raise SystemExit('error: the files to average do not hold the same tensors')
    torch.save({k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v
                for k, v in states[0].items()}, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', type=Path, required=True, help='where kd_long_seeds.sh put its runs')
    parser.add_argument('--seeds', type=int, nargs='+', required=True)
    parser.add_argument('--soup', type=Path, nargs='*', default=None, metavar='PTH',
                        help='also score the average of the students with the teacher and these exported files')
    args = parser.parse_args(argv)

    runs = {(arm, seed): args.runs / name.format(seed) for arm, name in ARMS.items() for seed in args.seeds}
    done = {key: run for key, run in runs.items() if (run / 'metrics.json').is_file()}
    shared = [run for (arm, _), run in done.items() if arm != 'teacher alone']
    if not shared:
        raise SystemExit(f'error: no finished student under {args.runs}')
    valid = validation_items(shared[0])
    for run in shared[1:]:
        if validation_items(run) != valid:
            raise SystemExit(f'error: {run} was validated on other photos than {shared[0]}: not comparable')

    scored = {}   # file -> right or wrong per validation photo: each file is scored once

    def score(weights: Path) -> list[bool]:
        if weights not in scored:
            scored[weights] = correct_alone(weights, valid)
        return scored[weights]

    hits = {key: score(exported(run)) for key, run in done.items() if key[0] != 'teacher alone'}
    accuracy = {key: sum(h) / len(valid) for key, h in hits.items()}
    print(f'{len(valid)} validation photos (the split of {shared[0].name}); students alone, no sidecar')
    print('| seed | with teacher | without | right only with / only without | McNemar p | teacher alone |')
    print('|---|---|---|---|---|---|')
    for seed in args.seeds:
        a, b = hits.get(('teacher', seed)), hits.get(('noteacher', seed))
        paired = ''
        if a and b:
            only_a, only_b = discordant(a, b)
            paired = f'{only_a} / {only_b} | {mcnemar_exact(only_a, only_b):.3g}'
        teacher = done.get(('teacher alone', seed))
        teacher_acc = json.loads((teacher / 'metrics.json').read_text())['valid_accuracy'] if teacher else None
        cells = [f'{accuracy[(arm, seed)]:.4f}' if (arm, seed) in accuracy else '-' for arm in ('teacher', 'noteacher')]
        print(f'| {seed} | {cells[0]} | {cells[1]} | {paired or "- | -"} | '
              f'{f"{teacher_acc:.4f} (160 px)" if teacher_acc is not None else "-"} |')
    for arm in ('teacher', 'noteacher'):
        values = [accuracy[(arm, s)] for s in args.seeds if (arm, s) in accuracy]
        if len(values) > 1:
            print(f'{arm}: mean {statistics.mean(values):.4f} +/- {statistics.stdev(values):.4f} (n={len(values)})')
    if args.soup is not None:
        members = [exported(done[('teacher', s)]) for s in args.seeds if ('teacher', s) in done] + args.soup
        average = soup(members, args.runs / 'soup_cnn_flowers.pth')
        soup_hits = score(average)
        print(f'soup of {len(members)} ({", ".join(map(str, members))}) -> {average}: '
              f'accuracy {sum(soup_hits) / len(valid):.4f}')
        for member in members:
            member_hits = score(member)
            only_soup, only_member = discordant(soup_hits, member_hits)
            print(f'  vs {member}: {sum(member_hits) / len(valid):.4f}; right only with the soup {only_soup}, '
                  f'only with it {only_member}; McNemar p = {mcnemar_exact(only_soup, only_member):.3g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
