"""Classify photos from the command line with the shipped weights (no fastai needed):

    python -m flowers_fastai.predict examples/            # every photo under a folder (recursive)
    python -m flowers_fastai.predict a.jpg b.png --model vit

Prints one line per file, `<path>\t<class>`; a file that cannot be classified prints `<path>\tERROR: <why>`
(on stderr) and the others go on; the exit status is 1 when any file failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .data_files import IMAGE_EXTENSIONS
from .submit import load_cnn_model, load_vit_model, predict


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, recursively, in sorted order."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', type=Path, help='image files and/or folders')
    parser.add_argument('--model', choices=['cnn', 'vit'], default='cnn', help='model family (default: %(default)s)')
    parser.add_argument('--weights', help='weights file (default: <family>_flowers.pth in . or weights/)')
    args = parser.parse_args(argv)

    loader = load_cnn_model if args.model == 'cnn' else load_vit_model
    try:
        model = loader(args.weights) if args.weights else loader()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f'error: {err}')
    failed = 0
    for path in expand(args.paths):
        try:
            print(f'{path}\t{predict(model, path)}', flush=True)
        except (FileNotFoundError, ValueError) as err:
            failed += 1
            print(f'{path}\tERROR: {err}', file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
