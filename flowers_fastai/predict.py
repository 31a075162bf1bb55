"""Classify photos from the command line with the shipped weights (no fastai needed):

    python -m flowers_fastai.predict examples/                       # every photo under a folder (recursive)
    python -m flowers_fastai.predict photos/ --csv predictions.csv   # + one CSV row per file, with probabilities
    python -m flowers_fastai.predict a.jpg b.png --model vit
    python -m flowers_fastai.predict photos/ --model ensemble --vit-weights vit_flowers.pth
    python -m flowers_fastai.predict photos/ --model vit --int8      # the ViT's matmuls in int8 (faster on CPU)

Photos are classified in batches (`--batch-size`), the next batch decoded while the model runs on this one.
Prints one line per file, `<path>\t<class>`; a file that cannot be classified prints `<path>\tERROR: <why>`
(on stderr) and the others go on; the exit status is 1 when any file failed. `--csv` writes one row per file:
path, class, the calibrated probability of each class, error (empty, or why the file has no class).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from .data_files import IMAGE_EXTENSIONS
from .inference import predict_files
from .labels import CLASSES
from .submit import load_cnn_model, load_ensemble, load_vit_model, quantize_int8


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, recursively, in sorted order."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def load_chosen_model(kind: str, weights: str | None = None, vit_weights: str | None = None,
                      int8: bool = False):
    """The model of a command line's `--model cnn|vit|ensemble`, `--weights` (the CNN's for an ensemble),
    `--vit-weights` and `--int8` (the ViT's matmuls in int8), defaulting to <family>_flowers.pth;
    FileNotFoundError / ValueError from `submit`."""
    if kind == 'cnn':
        if int8:
            raise ValueError('--int8 applies to the ViT only (--model vit or ensemble)')
        return load_cnn_model(weights or 'cnn_flowers.pth')
    if kind == 'vit':
        model = load_vit_model(vit_weights or weights or 'vit_flowers.pth')
    else:
        model = load_ensemble(weights or 'cnn_flowers.pth', vit_weights or 'vit_flowers.pth')
    return quantize_int8(model) if int8 else model   # an ensemble: its ViT member


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', type=Path, help='image files and/or folders')
    parser.add_argument('--model', choices=['cnn', 'vit', 'ensemble'], default='cnn',
                        help='model family, or both averaged (default: %(default)s)')
    parser.add_argument('--weights', help='weights file (default: <family>_flowers.pth in . or weights/; '
                                          'for the ensemble: the CNN file)')
    parser.add_argument('--vit-weights', help='the ensemble\'s ViT file (default: vit_flowers.pth)')
    parser.add_argument('--csv', type=Path, help='also write one CSV row per file (path, class, probabilities, error)')
    parser.add_argument('--batch-size', type=int, default=16, help='photos per forward pass (default: %(default)s)')
    parser.add_argument('--tta', action='store_true', help='average 6 views per photo (flip + crops): 6x slower')
    parser.add_argument('--int8', action='store_true',
                        help='the ViT\'s matmuls in int8: ~2x faster on CPU, slightly different probabilities '
                             '(measure the change with `python -m flowers_fastai.evaluate --int8`)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error('--batch-size must be at least 1')

    try:
        model = load_chosen_model(args.model, args.weights, args.vit_weights, args.int8)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    files = expand(args.paths)
    results = predict_files(model, files, batch_size=args.batch_size, tta=args.tta)
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        results = tqdm(results, total=len(files), unit='photo', file=sys.stderr)
    writer, csv_file = None, None
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        csv_file = args.csv.open('w', newline='')
        writer = csv.writer(csv_file)
        writer.writerow(['path', 'class', *CLASSES, 'error'])
    failed = 0
    try:
        for r in results:
            if r.error is None:
                print(f'{r.path}\t{r.label}', flush=True)
            else:
                failed += 1
                print(f'{r.path}\tERROR: {r.error}', file=sys.stderr, flush=True)
            if writer:
                probabilities = [f'{r.probabilities[c]:.6f}' for c in CLASSES] if r.probabilities else [''] * len(CLASSES)
                writer.writerow([str(r.path), r.label or '', *probabilities, r.error or ''])
    finally:
        if csv_file:
            csv_file.close()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
