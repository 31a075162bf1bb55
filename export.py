"""Export trained runs as the raw state_dicts that `flowers_fastai.submit` loads.

    python export.py                      # latest finished cnn and vit runs -> weights/cnn_flowers.pth, weights/vit_flowers.pth
    python export.py --run runs/cnn-...   # one run -> weights/<family>_flowers.pth
    python export.py --family cnn --half  # fp16 file (half the size; submit upcasts to fp32)

Each file gets a JSON sidecar (<name>.json) with the input size and the CLIP activation, which tensors cannot tell,
and the calibration temperature fitted on the run's validation photos (ECE before/after printed and stored there;
reliability diagram: <run>/reliability.png).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowers_fastai.delivery import DELIVERIES
from flowers_fastai.exporting import delivered_family, export_run, finished_runs
from flowers_fastai.run_folder import RunFolderError, read_run_config
from flowers_fastai.sidecar import Sidecar

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', type=Path, help='run folder to export (default: the latest finished run per family)')
    parser.add_argument('--family', choices=list(DELIVERIES), help='export only this family (default: every family with a run)')
    parser.add_argument('--runs', type=Path, default=Path('runs'), help='where to look for runs (default: %(default)s)')
    parser.add_argument('--out', type=Path, help='output file (default: weights/ and the family\'s file name, e.g. cnn_flowers.pth); needs one run')
    parser.add_argument('--half', action='store_true', help='store fp16 tensors (submit upcasts them to fp32)')
    parser.add_argument('--no-calibrate', action='store_true',
                        help='skip temperature scaling on the validation photos (temperature stays 1.0)')
    args = parser.parse_args(argv)

    warned = set()

    def warn(message: str) -> None:
        if message not in warned:    # a run with a broken config.json is met once per family
            warned.add(message)
            print(f'warning: {message}', file=sys.stderr)

    if args.run:
        jobs = [[args.run]]
    else:
        families = [args.family] if args.family else list(DELIVERIES)
        jobs = [runs for f in families if (runs := finished_runs(args.runs, f, warn=warn))]   # newest first
        if not jobs:
            sys.exit(f'error: no finished run under {args.runs}; train one with: python train.py cnn')
    if args.out and len(jobs) > 1:
        sys.exit('error: --out needs a single run: add --run or --family')
    failed = []
    for candidates in jobs:
        for run in candidates:
            try:
                family = delivered_family(read_run_config(run), run)
                out = args.out or ROOT / 'weights' / family.delivery.weights_file
                export_run(run, out, half=args.half, calibrated=not args.no_calibrate)
            except RunFolderError as err:
                if args.run:             # the run asked for: one sentence, no fallback
                    sys.exit(f'error: {err}')
                warn(f'skipped {run}: {err}')   # a broken latest run: the next newest of its family instead
                continue
            except (OSError, ValueError) as err:   # e.g. writing the output (disk full): no other run would fare better
                sys.exit(f'error: {run}: {err}')
            print(f'{run} -> {out} (+ {Sidecar.path_for(out).name})')
            calibration = Sidecar.read(out).provenance.get('calibration')
            if calibration:
                print(f'  calibration on {calibration["n_valid"]} validation photos: '
                      f'T = {calibration["temperature"]:.3f}, '
                      f'ECE {calibration["ece_before"]:.4f} -> {calibration["ece_after"]:.4f}, '
                      f'NLL {calibration["nll_before"]:.4f} -> {calibration["nll_after"]:.4f}')
            break
        else:
            failed.append(', '.join(map(str, candidates)))
    if failed:
        sys.exit(f'error: no run could be exported among: {"; ".join(failed)} (see the warnings above)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
