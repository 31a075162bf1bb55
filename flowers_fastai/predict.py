"""Classify photos from the command line with the shipped weights (no fastai needed):

    python -m flowers_fastai.predict examples/                       # every photo under a folder (recursive)
    python -m flowers_fastai.predict photos/ --csv predictions.csv   # + one CSV row per file, with probabilities
    python -m flowers_fastai.predict a.jpg b.png --model vit
    python -m flowers_fastai.predict photos/ --model ensemble --vit-weights vit_flowers.pth
    python -m flowers_fastai.predict photos/ --model vit --int8      # the ViT's matmuls in int8 (faster on CPU)

Photos are classified in batches (`--batch-size`), the next batch decoded while the model runs on this one.
Prints one line per file, `<path>\t<class>` (a backslash, tab, newline or carriage return in a path written as
\\\\, \\t, \\n, \\r); a file that cannot be classified, for whatever reason its decoder gives, prints
`<path>\tERROR: <why>` (on stderr) and the others go on; the exit status is 1 when any file failed, 2 when the
model cannot load.
`--csv` writes one row per file: path, class, the calibrated probability of each class, error (empty, or why
the file has no class).

Output rules (shared with `python -m flowers_fastai.evaluate`):
- paths are written as the file system's own bytes (`os.fsencode`: UTF-8, a name that is not valid UTF-8 keeps
  its bytes), on stdout, on stderr and in the CSV;
- a CSV cell that starts with = + - @ tab, carriage return or ' gets a leading ' (spreadsheets would run it as a
  formula): drop one leading ' to read the value back;
- `--csv` never overwrites an input (a photo, the weights): exit status 2 and one line; it says so on stderr when
  it replaces another file; an output that cannot be written is one line and exit status 2;
- a closed stdout (`| head -1`) ends the run quietly with exit status 141 (128 + SIGPIPE, as other tools).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .data_files import scan_folder
from .inference import FileResult, predict_files
from .labels import CLASSES
from .delivery import DELIVERIES
from .sidecar import Sidecar
from .submit import find_weights, load_ensemble, loader_for, quantize_int8

EXIT_OUTPUT_ERROR = 2     # an output refused or not writable (argparse's usage errors are 2 too)
EXIT_MODEL_ERROR = 2      # the model cannot load: nothing was classified (1 means some photo failed), as `evaluate`
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE: what a shell reports for a tool that stops at `| head`

# Paths are written as the file system's bytes: os.fsencode's encoding and error handler (UTF-8 +
# surrogateescape on POSIX), so a name that is not valid UTF-8 is written losslessly instead of crashing.
PATH_ENCODING = sys.getfilesystemencoding()
PATH_ERRORS = sys.getfilesystemencodeerrors()

# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection"); ' is added so that
# dropping one leading ' always gives the value back.
FORMULA_TRIGGERS = ('=', '+', '-', '@', '\t', '\r', "'")


class OutputError(Exception):
    """An output file cannot be written, or must not be: reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------- output helpers
_LINE_ESCAPES = str.maketrans({'\\': '\\\\', '\t': '\\t', '\n': '\\n', '\r': '\\r'})


def line_field(value) -> str:
    """`value` as one field of a `<path>\t<class>` line: backslash, tab, newline and carriage return written as
    \\\\, \\t, \\n, \\r, so that a file name cannot end its line or forge another `<path>\t<class>` line."""
    return str(value).translate(_LINE_ESCAPES)


def spreadsheet_cell(value) -> str:
    """`value` as a CSV cell no spreadsheet runs as a formula: a leading ' where it starts with FORMULA_TRIGGERS."""
    text = str(value)
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


class CsvOutput:
    """A CSV file written with the output rules (paths as bytes, cells made formula-safe); every OSError while
    writing or closing it (a full disk, a closed pipe) becomes an OutputError naming the file."""

    def __init__(self, path: Path, what: str = 'the CSV file'):
        self.path, self.what = Path(path), what
        try:
            self._file = open(self.path, 'w', newline='', encoding=PATH_ENCODING, errors=PATH_ERRORS)
        except OSError as err:
            raise OutputError(f'cannot write {what} {self.path}: {err.strerror or err}') from None
        self._writer = csv.writer(self._file)

    def row(self, cells: Iterable) -> None:
        try:
            self._writer.writerow([spreadsheet_cell(c) for c in cells])
        except OSError as err:
            raise OutputError(f'cannot write {self.what} {self.path}: {err.strerror or err}') from None

    def rows(self, rows: Iterable[Iterable]) -> None:
        for cells in rows:
            self.row(cells)

    def close(self) -> None:
        try:
            self._file.close()   # the last rows are written here: a full disk shows now
        except OSError as err:
            raise OutputError(f'cannot write {self.what} {self.path}: {err.strerror or err}') from None

    def abandon(self) -> None:
        """Close after another error, without raising."""
        with contextlib.suppress(OSError):
            self._file.close()


def check_writable_place(target: Path, what: str) -> None:
    """OutputError now, before any photo is classified, when `target` (a file to write, or a folder to make)
    cannot be created: its nearest existing ancestor is not a folder, or it refuses a new file."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f'cannot write {what} {target}: {parent} is not a folder')
    try:
        with tempfile.TemporaryFile(dir=parent):   # the real test (os.access is blind to read-only mounts, root)
            pass
    except OSError as err:
        raise OutputError(f'cannot write {what} {target}: {parent} is not writable ({err.strerror or err})') \
            from None


def _same_file(a: Path, a_stat: os.stat_result | None, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    if a_stat is None:
        return False
    try:
        b_stat = b.stat()
    except OSError:
        return False
    return (a_stat.st_dev, a_stat.st_ino) == (b_stat.st_dev, b_stat.st_ino)


def check_output_file(target: Path, inputs: Iterable[Path], what: str) -> None:
    """OutputError when `target` is one of `inputs` (the same path, or the same file through a link), is a folder,
    or cannot be created; a note on stderr when it will replace another existing file."""
    try:
        target_stat = target.stat()
    except OSError:
        target_stat = None
    for path in inputs:
        if _same_file(target, target_stat, path):
            raise OutputError(f'refusing to write {what} {target}: it is one of the inputs ({path}); '
                              'choose another file name')
    if target.is_dir():
        raise OutputError(f'cannot write {what} {target}: it is a folder')
    if target_stat is None:
        check_writable_place(target, what)
    elif target.is_file():
        # through a symbolic link the file replaced is the link's target: name that one
        linked = f', the file {target.resolve()} that this link points to' if target.is_symlink() else ''
        print(f'note: replacing the existing file {target}{linked} ({what})', file=sys.stderr, flush=True)


@contextlib.contextmanager
def paths_as_bytes():
    """stdout and stderr encode as the file system does (PATH_ENCODING) for the duration, then as before: a
    file name that is not valid UTF-8 prints as its own bytes instead of raising UnicodeEncodeError."""
    saved = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            with contextlib.suppress(Exception):
                stream.flush()
                encoding, errors = stream.encoding, stream.errors
                stream.reconfigure(encoding=PATH_ENCODING, errors=PATH_ERRORS)
                saved.append((stream, encoding, errors))
    try:
        yield
    finally:
        for stream, encoding, errors in saved:
            with contextlib.suppress(Exception):   # a closed or broken stream stays as it is
                stream.reconfigure(encoding=encoding, errors=errors)


def stdout_gone() -> int:
    """After a BrokenPipeError on stdout (`| head -1`): the rest of the output goes to devnull, so Python's
    flush at exit cannot raise again (the recipe of Python's `signal` docs); returns EXIT_BROKEN_PIPE."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


# ----------------------------------------------------------------------------------------- classification
def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files, recursively, in sorted order."""
    files = []
    for path in paths:
        if path.is_dir():   # lenient: hidden files too, nothing labelled, non-images silently left out
            files += [file for file, _ in scan_folder(path, strict=False).items]
        else:
            files.append(path)
    return files


def classify_files(model, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                   tta: bool = False) -> Iterator[FileResult]:
    """`inference.predict_files`, one result per path in order, but no exception ends the run: when a batch
    raises (a decoder error of a type predict_files does not expect, the model failing on one photo), its
    files are classified again one by one, and the one that raises becomes a result with its error."""
    paths = [Path(p) for p in paths]
    start = 0
    while start < len(paths):
        done = start
        try:
            for result in predict_files(model, paths[start:], batch_size=batch_size, tta=tta):
                yield result
                done += 1
            return
        except Exception:   # noqa: BLE001 - raised for a file of the batch that starts at `done`
            pass
        end = min(done + batch_size, len(paths))
        for path in paths[done:end]:
            try:
                yield from predict_files(model, [path], batch_size=1, tta=tta)
            except Exception as err:   # noqa: BLE001 - this file's own failure: its row, and the others go on
                yield FileResult(path, error=f'{type(err).__name__}: {err}')
        start = end


def auto_threads() -> int:
    """The intra-op threads to compute with: the cores no other work is using, by the 1-minute load average, at
    least 1 (at most torch's default). PyTorch's OpenMP threads wait for each other at every layer: on a 2-core
    machine whose cores another job kept busy, a prediction took ~1.3 s on 2 threads against ~44 ms on 1
    (docs/speed.md). On a quiet machine it is torch's default."""
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):   # no load average on this platform
        busy = 0.0
    return max(1, min(torch_default_threads(), (os.cpu_count() or 1) - int(busy + 0.5)))


def torch_default_threads() -> int:
    import torch
    return torch.get_num_threads()


def threads_option(text: str) -> int | None:
    """`--threads`: 'auto' (None: `auto_threads`) or a whole number >= 1."""
    if text == 'auto':
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is neither "auto" nor a whole number of threads >= 1')
    return n


def set_threads(n: int | None) -> int:
    """torch's intra-op threads for this process (a command line owns its process): `n`, or `auto_threads()`."""
    import torch
    torch.set_num_threads(n or auto_threads())
    return torch.get_num_threads()


def load_chosen_model(kind: str, weights: str | None = None, vit_weights: str | None = None,
                      int8: bool = False):
    """The model of a command line's `--model <family>|ensemble` (the families of the delivery registry),
    `--weights` (the CNN's for an ensemble), `--vit-weights` and `--int8` (the ViT's matmuls in int8), each file
    defaulting to its family's; FileNotFoundError / ValueError from `submit`."""
    if int8 and kind not in ('vit', 'ensemble'):
        raise ValueError('--int8 applies to the ViT only (--model vit or ensemble)')
    if kind == 'ensemble':
        model = load_ensemble(weights, vit_weights)   # None: each family's default file
    else:
        path = (vit_weights or weights) if kind == 'vit' else weights
        model = loader_for(kind)(path or DELIVERIES[kind].weights_file)
    return quantize_int8(model) if int8 else model   # an ensemble: its ViT member


def model_choices() -> list[str]:
    """`--model`'s choices: every delivered family, and all of them averaged."""
    return [*DELIVERIES, 'ensemble']


def weights_files(kind: str, weights: str | None, vit_weights: str | None) -> list[Path]:
    """The weights files (and sidecars) `load_chosen_model` would read, those that exist: inputs too."""
    defaults = [entry.weights_file for name, entry in DELIVERIES.items() if kind in (name, 'ensemble')]
    found = []
    for name in [n for n in (weights, vit_weights) if n] + defaults:
        with contextlib.suppress(OSError):   # a missing file is load_chosen_model's error to report
            path = find_weights(name)
            found += [path, Sidecar.path_for(path)]
    return found


def run_cli(cli_main, argv) -> int:
    """A command line's `cli_main(argv)` under the output rules shared by `predict` and `evaluate`: paths written
    as the file system's bytes, an unwritable output one `error:` line, a closed stdout a quiet exit."""
    with paths_as_bytes():
        try:
            return cli_main(argv)
        except OutputError as err:
            print(f'error: {err}', file=sys.stderr)
            return EXIT_OUTPUT_ERROR
        except BrokenPipeError:
            return stdout_gone()


def main(argv=None) -> int:
    import torch
    threads = torch.get_num_threads()
    try:
        return run_cli(_main, argv)
    finally:   # --threads is for this run: a caller of main() (a test, a notebook) keeps its own setting
        torch.set_num_threads(threads)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', type=Path, help='image files and/or folders')
    parser.add_argument('--model', choices=model_choices(), default='cnn',
                        help='model family, or both averaged (default: %(default)s)')
    parser.add_argument('--weights', help='weights file (default: <family>_flowers.pth in . or weights/; '
                                          'for the ensemble: the CNN file)')
    parser.add_argument('--vit-weights', help=f'the ensemble\'s ViT file (default: {DELIVERIES["vit"].weights_file})')
    parser.add_argument('--csv', type=Path, help='also write one CSV row per file (path, class, probabilities, '
                                                 'error); never one of the inputs')
    parser.add_argument('--batch-size', type=int, default=16, help='photos per forward pass (default: %(default)s)')
    parser.add_argument('--tta', action='store_true', help='average 6 views per photo (flip + crops): 6x slower')
    parser.add_argument('--int8', action='store_true',
                        help='the ViT\'s matmuls in int8: ~2x faster on CPU, slightly different probabilities '
                             '(measure the change with `python -m flowers_fastai.evaluate --int8`)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    parser.add_argument('--threads', type=threads_option, default='auto',
                        help='intra-op threads: a number, or auto: the cores the load average shows idle, at least 1 '
                             '(default: %(default)s; on a busy CPU more threads are much slower)')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error('--batch-size must be at least 1')
    set_threads(args.threads)

    files = expand(args.paths)
    if args.csv:   # before the (slow) model load: a refused or unwritable --csv is said at once
        check_output_file(args.csv, [*files, *weights_files(args.model, args.weights, args.vit_weights)], '--csv')
    try:
        model = load_chosen_model(args.model, args.weights, args.vit_weights, args.int8)
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_MODEL_ERROR
    results = classify_files(model, files, batch_size=args.batch_size, tta=args.tta)
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        results = tqdm(results, total=len(files), unit='photo', file=sys.stderr)
    table = None
    if args.csv:
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f'cannot write --csv {args.csv}: {err.strerror or err}') from None
        table = CsvOutput(args.csv, '--csv')
        table.row(['path', 'class', *CLASSES, 'error'])
    failed = 0
    try:
        for r in results:
            if r.error is None:
                print(f'{line_field(r.path)}\t{r.label}', flush=True)
            else:
                failed += 1
                print(f'{line_field(r.path)}\tERROR: {line_field(r.error)}', file=sys.stderr, flush=True)
            if table:
                probabilities = [f'{r.probabilities[c]:.6f}' for c in CLASSES] if r.probabilities else [''] * len(CLASSES)
                table.row([str(r.path), r.label or '', *probabilities, r.error or ''])
    except BaseException:
        if table:
            table.abandon()   # the rows so far stay in the file
        raise
    if table:
        table.close()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
