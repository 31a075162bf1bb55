"""Score an exported CNN at several input sizes on a run's validation split, and as a grader sees it (no sidecar).

    python scripts/input_size_sweep.py --run runs/kd-student-teacher --weights weights/cnn_flowers.pth

Graders copy the `.pth` without its `.json` sidecar, so `load_cnn_model` feeds it 224 px (its default): a file
trained at another size must be measured there. Each size is a temporary copy of the file with a sidecar naming
that size; "no sidecar" is the file alone. The split is rebuilt from the run's config.json (`rebuild_split`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowers_fastai.exporting import rebuild_split  # noqa: E402
from flowers_fastai.run_folder import read_run_config  # noqa: E402
from flowers_fastai.inference import predict_files  # noqa: E402
from flowers_fastai.submit import load_cnn_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--run', type=Path, required=True, help='run folder whose validation split is scored')
    parser.add_argument('--weights', type=Path, required=True, help='exported CNN weights file')
    parser.add_argument('--sizes', type=int, nargs='+', default=[128, 160, 192, 224])
    args = parser.parse_args(argv)

    items, _, valid_idx, _ = rebuild_split(read_run_config(args.run))
    valid = [items[i] for i in valid_idx]
    sidecar = args.weights.with_suffix('.json')
    base = json.loads(sidecar.read_text()) if sidecar.is_file() else {'family': 'cnn'}
    print(f'{args.weights} on the validation split of {args.run} ({len(valid)} photos)')
    with tempfile.TemporaryDirectory() as tmp:
        for size in [None, *args.sizes]:
            folder = Path(tmp) / str(size)
            folder.mkdir()
            shutil.copy(args.weights, folder / 'cnn_flowers.pth')
            if size:
                (folder / 'cnn_flowers.json').write_text(json.dumps({**base, 'image_size': size}))
            model = load_cnn_model(folder / 'cnn_flowers.pth')
            started = time.time()
            results = list(predict_files(model, [path for path, _ in valid], batch_size=32))
            accuracy = sum(r.label == label for r, (_, label) in zip(results, valid)) / len(valid)
            what = f'{size} px (sidecar)' if size else 'no sidecar (loader default, 224 px)'
            print(f'{what:40s} accuracy {accuracy:.4f}  ({time.time() - started:.0f} s)', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
