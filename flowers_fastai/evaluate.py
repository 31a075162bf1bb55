"""Evaluate exported weights on any labelled folder of class folders (no fastai needed):

    python -m flowers_fastai.evaluate --weights weights/cnn_flowers.pth --data DIR [--tta] [--out DIR]
    python -m flowers_fastai.evaluate --weights cnn_flowers.pth --weights vit_flowers.pth --data DIR   # ensemble

DIR holds one folder per class (`DIR/<class>/**/<image>`; names as in training: `Roses/` means rose). Prints a short
summary and writes into --out (default `eval/<weights stem>-<data folder name>/`): metrics.json, the confusion
matrix (confusion_matrix.csv / .png, rows = true class, columns = predicted), misclassified.csv (path, true,
predicted, the probability of each class; most confident mistakes first), predictions.csv (every photo),
failed.csv (files that could not be decoded: reported, never counted) and reliability.png (accuracy against
confidence, with the top-label ECE). With --tta every number is also computed with test-time augmentation (the 6
views of `inference.tta_views`, probabilities averaged) and shown beside the plain one; the TTA files end in `_tta`.
With --int8, the same again with the ViT's matmuls in int8 (`submit.quantize_int8`), plus the share of photos whose
class is the fp32 one: the accuracy change int8 costs, measured on your photos (files end in `_int8`).

Outputs follow `python -m flowers_fastai.predict`'s rules: paths written as the file system's bytes (stdout,
stderr, CSV; metrics.json escapes them as JSON does), CSV cells made formula-safe (a leading ' before = + - @ tab,
carriage return or '), an --out inside the data folder refused and an unwritable one reported in one line (exit
status 2), a closed stdout ending the run quietly (exit status 141). A file that fails to decode, whatever the
error, is a row of failed.csv.

Library use (export-time calibration, benchmarks):

    from flowers_fastai.evaluate import evaluate, scan_labelled_folder, load_models
    result = evaluate(load_models(['weights/cnn_flowers.pth']), scan_labelled_folder('DIR').items, tta=False)
    result['accuracy'], result['per_class']['rose']['f1'], result['probabilities']  # N x 5 tensor
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .calibration import reliability_diagram
from .data_files import IMAGE_EXTENSIONS, scan_folder
from .inference import Ensemble, members
from .inference_nets import ClipViTClassifier, quantize_int8
from .labels import CLASSES, normalize_class_name
from .metrics import ECE_BINS, accuracy, classification_metrics
from .predict import CsvOutput, OutputError, check_writable_place, classify_files, run_cli
from .preprocess import TruncatedImageWarning
from .submit import find_weights, load_any_model

__all__ = ['ARRAY_KEYS', 'ECE_BINS', 'EvaluationError', 'LabelledFolder', 'scan_labelled_folder', 'load_models',
           'classification_metrics', 'evaluate', 'summary_numbers', 'default_out', 'main']

# keys of evaluate()'s result that hold tensors / per-photo data rather than summary numbers
ARRAY_KEYS = ('paths', 'targets', 'probabilities')
VARIANT_NAMES = {'plain': 'plain', 'tta': 'TTA', 'int8': 'int8 ViT'}   # evaluated forms of the model, as shown


class EvaluationError(ValueError):
    """The folder or the weights cannot be evaluated as they are (said before any photo is classified)."""


# ------------------------------------------------------------------------------------------------ the folder
@dataclass
class LabelledFolder:
    """The photos of a folder of class folders (`items`: (path, class name)), and what was left out."""
    root: Path
    items: list[tuple[Path, str]]
    non_images: list[Path] = field(default_factory=list)
    unreadable_folders: list[tuple[Path, str]] = field(default_factory=list)   # (folder, why) it could not be listed

    @property
    def missing_classes(self) -> list[str]:
        present = {label for _, label in self.items}
        return [c for c in CLASSES if c not in present]


def scan_labelled_folder(root: str | os.PathLike) -> LabelledFolder:
    """List `root/<class>/**/<file>`: class-folder names normalised (`Roses/` -> rose, several folders may mean
    one class), files with an image extension kept (decoding is checked when they are classified), other files
    counted in `non_images`, hidden files and folders and files directly in `root` ignored. A class may be
    absent (a small test folder); a folder that names no class, or no image at all, is an `EvaluationError`."""
    root = Path(root)
    found = scan_folder(root, strict=True, error=EvaluationError)
    if not found.folders:
        raise EvaluationError(f'{root} has no class folders; expected {root}/<class>/<photos> with <class> one of '
                              f'{CLASSES}')
    if not found.items:
        names = [folder.name for folders in found.folders.values() for folder in folders]
        raise EvaluationError(f'{root}: no image files in its class folders {names} '
                              f'(extensions {sorted(IMAGE_EXTENSIONS)})')
    return LabelledFolder(root=root, items=found.items, non_images=found.non_images,
                          unreadable_folders=found.unreadable)


def merged(folders: list[LabelledFolder]) -> LabelledFolder:
    """Several scanned folders as one (photos in folder order); one folder as it is."""
    if len(folders) == 1:
        return folders[0]
    return LabelledFolder(root=folders[0].root, items=[item for f in folders for item in f.items],
                          non_images=[p for f in folders for p in f.non_images],
                          unreadable_folders=[u for f in folders for u in f.unreadable_folders])


def accuracy_by_folder(result: dict, folders: list[LabelledFolder]) -> dict[str, dict]:
    """Each folder's accuracy and photo count in an `evaluate` result over their merged photos (photos that
    failed to decode count nowhere, as in the overall numbers)."""
    from .data_files import folder_names
    source = {str(path): k for k, f in enumerate(folders) for path, _ in f.items}
    predicted = result['probabilities'].argmax(1)
    out = {}
    for k, name in enumerate(folder_names([f.root for f in folders])):
        mine = [i for i, path in enumerate(result['paths']) if source[path] == k]
        right = sum(int(predicted[i] == result['targets'][i]) for i in mine)
        out[name] = {'n_photos': len(mine), 'accuracy': right / len(mine) if mine else None}
    return out


# ----------------------------------------------------------------------------------------------- the model
def load_models(weights_paths: Sequence[str | os.PathLike]) -> nn.Module:
    """One weights file -> its model (`submit.load_any_model`: CNN or ViT, by the sidecar's `family` or the key
    names); several -> an `inference.Ensemble` of them (their calibrated probabilities averaged)."""
    if isinstance(weights_paths, (str, os.PathLike)):
        weights_paths = [weights_paths]
    if not weights_paths:
        raise EvaluationError('no weights file given')
    models = [load_any_model(weights) for weights in weights_paths]
    return models[0] if len(models) == 1 else Ensemble(models)


# --------------------------------------------------------------------------------------------- the numbers
def _class_index(label) -> int:
    if isinstance(label, str):
        name = normalize_class_name(label)
        if name is None:
            raise ValueError(f'label {label!r} is not one of {CLASSES}')
        return CLASSES.index(name)
    index = int(label)
    if not 0 <= index < len(CLASSES):
        raise ValueError(f'label {label!r} is not a class index 0..{len(CLASSES) - 1}')
    return index


def evaluate(model: nn.Module, items: Iterable[tuple[str | os.PathLike, str | int]], batch_size: int = 16,
             tta: bool = False, progress: bool | None = True, n_bins: int = ECE_BINS) -> dict:
    """Classify `items` ((path, label): a class name of CLASSES, a folder spelling such as 'Roses', or a class
    index; e.g. `scan_labelled_folder(DIR).items`) with `model` (from `load_models` or `submit.load_*`), in
    batches through `inference.predict_files` (`predict.classify_files`: any error of one file, of whatever
    type, fails that file only), and measure the (calibrated) probabilities.

    Returns `classification_metrics(...)` plus: 'tta'; 'n_files' (items given); 'failed' (list of {'path',
    'error'}: files that could not be decoded, counted nowhere else) and 'n_failed'; 'misclassified' (list of
    {'path', 'true', 'predicted', 'probabilities': {class: p}}, most confident mistake first); and, per photo
    evaluated, in order: 'paths' (list of str), 'targets' (LongTensor N) and 'probabilities' (float32 tensor
    N x 5) -- the keys of ARRAY_KEYS, left out of metrics.json.
    For a single model whose `flowers_temperature` is 1.0 and tta=False, `probabilities.log()` are its logits
    up to a per-photo constant (which softmax ignores): `calibration.fit_temperature(result['probabilities']
    .clamp_min(1e-30).log(), result['targets'])` fits its temperature.

    `progress`: a tqdm bar on stderr (None: only when stderr is a terminal). Raises `EvaluationError` when no
    file could be decoded."""
    from tqdm.auto import tqdm

    if int(batch_size) < 1:
        raise ValueError(f'batch_size must be >= 1, not {batch_size}')
    members(model)   # TypeError now, for anything that is not a delivery model or ensemble
    items = [(Path(path), _class_index(label)) for path, label in items]
    paths, targets, probs, failed = [], [], [], []
    results = classify_files(model, [path for path, _ in items], batch_size=int(batch_size), tta=tta)
    bar = tqdm(total=len(items), desc='evaluate (TTA)' if tta else 'evaluate', unit='photo', file=sys.stderr,
               disable=None if progress is None else not progress, leave=False, dynamic_ncols=True)
    with bar:
        for (path, target), result in zip(items, results):
            bar.update(1)
            assert result.path == path   # predict_files keeps the order
            if result.error is not None:
                failed.append({'path': str(path), 'error': result.error})
                continue
            paths.append(str(path))
            targets.append(target)
            probs.append([result.probabilities[c] for c in CLASSES])
    if not probs:
        shown = '; '.join(f'{f["path"]}: {f["error"]}' for f in failed[:3])
        raise EvaluationError(f'none of the {len(items)} file(s) could be classified ({shown}'
                              f'{" ..." if len(failed) > 3 else ""})')
    probabilities = torch.tensor(probs, dtype=torch.float32)
    targets = torch.tensor(targets, dtype=torch.long)
    metrics = classification_metrics(probabilities, targets, n_bins)
    predicted = probabilities.argmax(dim=1)
    wrong = [i for i in range(len(paths)) if predicted[i] != targets[i]]
    wrong.sort(key=lambda i: -float(probabilities[i, predicted[i]]))
    misclassified = [{'path': paths[i], 'true': CLASSES[targets[i]], 'predicted': CLASSES[predicted[i]],
                      'probabilities': {c: float(v) for c, v in zip(CLASSES, probabilities[i].tolist())}}
                     for i in wrong]
    return {'tta': bool(tta), 'n_files': len(items), 'n_failed': len(failed), 'failed': failed, **metrics,
            'misclassified': misclassified, 'paths': paths, 'targets': targets, 'probabilities': probabilities}


def summary_numbers(result: dict) -> dict:
    """`evaluate`'s result without the per-photo data (ARRAY_KEYS, the misclassified list): what metrics.json
    holds per variant."""
    return {k: v for k, v in result.items() if k not in ARRAY_KEYS and k not in ('misclassified', 'failed')}


# -------------------------------------------------------------------------------------------------- files
def _write_csv(path: Path, header: list[str], rows: Iterable[list]) -> Path:
    """Paths as the file system's bytes, cells formula-safe (`predict.CsvOutput`); OutputError if it fails."""
    table = CsvOutput(path, 'the file')
    try:
        table.row(header)
        table.rows(rows)
    except BaseException:
        table.abandon()
        raise
    table.close()
    return path


def write_confusion_csv(cm: list[list[int]], path: Path) -> Path:
    """Rows: true class; columns: predicted class (CLASSES order)."""
    return _write_csv(path, ['true\\predicted'] + CLASSES, [[c] + row for c, row in zip(CLASSES, cm)])


def _probability_rows(paths, targets, probabilities) -> list[list]:
    predicted = probabilities.argmax(dim=1)
    return [[p, CLASSES[t], CLASSES[int(q)]] + [f'{v:.6f}' for v in row]
            for p, t, q, row in zip(paths, targets.tolist(), predicted, probabilities.tolist())]


def write_confusion_png(cm: list[list[int]], path: Path, title: str) -> Path:
    """The confusion matrix as a heat map (colour: share of the true class's photos; text: counts)."""
    from matplotlib.figure import Figure   # lazy: only for the pictures

    counts = torch.tensor(cm, dtype=torch.float64)
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig = Figure(figsize=(6.0, 5.2), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(share.numpy(), cmap='Blues', vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label='share of the true class')
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, str(cm[i][j]), ha='center', va='center',
                    color='white' if share[i, j] > 0.5 else 'black', fontsize=10)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha='right')
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format='png')
    return path


def _write_outputs(out: Path, results: dict[str, dict], n_bins: int) -> list[str]:
    """CSV files and pictures of each variant (VARIANT_NAMES); returns the names written."""
    written = []
    for variant, result in results.items():
        suffix = '' if variant == 'plain' else f'_{variant}'
        rows = _probability_rows(result['paths'], result['targets'], result['probabilities'])
        _write_csv(out / f'predictions{suffix}.csv', ['path', 'true', 'predicted'] + CLASSES, rows)
        _write_csv(out / f'misclassified{suffix}.csv', ['path', 'true', 'predicted'] + CLASSES,
                   [[m['path'], m['true'], m['predicted']] + [f'{m["probabilities"][c]:.6f}' for c in CLASSES]
                    for m in result['misclassified']])
        write_confusion_csv(result['confusion_matrix'], out / f'confusion_matrix{suffix}.csv')
        written += [f'predictions{suffix}.csv', f'misclassified{suffix}.csv', f'confusion_matrix{suffix}.csv']
    plain = results['plain']
    _write_csv(out / 'failed.csv', ['path', 'error'], [[f['path'], f['error']] for f in plain['failed']])
    written.append('failed.csv')
    try:
        for variant, result in results.items():
            suffix = '' if variant == 'plain' else f'_{variant}'
            name = VARIANT_NAMES[variant]
            write_confusion_png(result['confusion_matrix'], out / f'confusion_matrix{suffix}.png',
                                f'{name}: accuracy {result["accuracy"]:.4f} on {result["n_photos"]} photos')
            written.append(f'confusion_matrix{suffix}.png')
        tta = results.get('tta')
        reliability_diagram(plain['probabilities'], tta['probabilities'] if tta else None, plain['targets'],
                            out / 'reliability.png', n_bins=n_bins,
                            title=f'Reliability of the (calibrated) probabilities, {plain["n_photos"]} photos',
                            names=('plain', 'TTA'))
        written.append('reliability.png')
    except ImportError as err:
        print(f'warning: no pictures written ({err}); pip install matplotlib for them', file=sys.stderr)
    return written


# ---------------------------------------------------------------------------------------------- the summary
def _table(results: dict[str, dict]) -> list[str]:
    variants = list(results)
    head = [VARIANT_NAMES[v] for v in variants]

    def fmt(row_name, values):
        return (f'{row_name:<24}' + ''.join(f'{v:>20}' for v in values)).rstrip()

    lines = [fmt('', head)]
    for key, name in (('accuracy', 'accuracy'), ('macro_f1', 'macro F1'), ('ece', f'ECE ({ECE_BINS} bins)'),
                      ('nll', 'NLL'), ('mean_confidence', 'mean confidence')):
        lines.append(fmt(name, [f'{results[v][key]:.4f}' for v in variants]))
    lines.append(fmt('misclassified', [f'{results[v]["n_misclassified"]} / {results[v]["n_photos"]}'
                                       for v in variants]))
    if 'int8' in results:
        lines.append(fmt('same class as plain', ['' if v != 'int8' else f'{results[v]["agreement_with_plain"]:.4f}'
                                                 for v in variants]))
    lines.append(fmt('per class: P / R / F1', [''] * len(variants)))
    for c in CLASSES:
        stats = [results[v]['per_class'][c] for v in variants]
        lines.append(fmt(f'  {c} (n={stats[0]["support"]})',
                         [f'{s["precision"]:.2f} / {s["recall"]:.2f} / {s["f1"]:.2f}' for s in stats]))
    return lines


def _describe(model: nn.Module, weights: list[Path]) -> list[dict]:
    return [{'path': str(path), 'family': m.flowers_family,
             'image_size': m.flowers_preprocessing.size, 'temperature': float(m.flowers_temperature)}
            for path, m in zip(weights, members(model))]


def default_out(weights: Sequence[str | os.PathLike], data) -> Path:
    """eval/<weights stem>-<data folder name> (stems, and folder names, joined with '+' for an ensemble or
    several folders), under the cwd."""
    stems = '+'.join(Path(w).stem for w in weights)
    folders = [data] if isinstance(data, (str, os.PathLike)) else data
    return Path('eval') / f'{stems}-{"+".join(Path(d).resolve().name for d in folders)}'


OUTPUT_NAMES = ('metrics.json', 'predictions.csv', 'misclassified.csv', 'failed.csv', 'confusion_matrix.csv',
                'confusion_matrix.png', 'reliability.png')


def check_out_folder(out: Path, data: Path) -> None:
    """OutputError now, before any photo is classified, when `out` cannot hold the results: inside the data
    folder (its files would mix with the photos, and be scanned as photos next time), a file, or not creatable;
    a note on stderr when it holds an earlier evaluation's files, which are replaced."""
    resolved, data_resolved = out.resolve(), data.resolve()
    if resolved == data_resolved or resolved.is_relative_to(data_resolved):
        raise OutputError(f'refusing to write into --out {out}: it is inside the data folder {data} '
                          '(the results would mix with the photos); choose another --out')
    if out.exists() and not out.is_dir():
        raise OutputError(f'cannot write into --out {out}: it is a file, not a folder')
    check_writable_place(out / 'metrics.json', 'into --out')
    earlier = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if earlier:
        print(f'note: replacing the earlier results in {out} ({", ".join(earlier)} ...)', file=sys.stderr,
              flush=True)


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog='python -m flowers_fastai.evaluate', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--weights', action='append', required=True, metavar='FILE',
                        help='exported weights (looked up in the cwd, then in weights/); twice (e.g. a CNN and a '
                             'ViT file) for their ensemble')
    parser.add_argument('--data', type=Path, nargs='+', required=True, metavar='DIR',
                        help='folder(s) of class folders; several: evaluated together, with each folder\'s '
                             'accuracy too')
    parser.add_argument('--tta', action='store_true', help='also evaluate with test-time augmentation (6 views)')
    parser.add_argument('--out', type=Path, metavar='DIR',
                        help='output folder (default: eval/<weights stem>-<data folder name>)')
    parser.add_argument('--batch-size', type=int, default=16, metavar='N', help='photos per batch (default 16)')
    parser.add_argument('--int8', action='store_true',
                        help='also evaluate with the ViT\'s matmuls in int8 (submit.quantize_int8), and report how '
                             'often its class agrees with the fp32 one')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    warnings.simplefilter('always', TruncatedImageWarning)   # one line per truncated photo, not one in all

    out = args.out if args.out is not None else default_out(args.weights, args.data)
    try:
        folders = [scan_labelled_folder(data) for data in args.data]
        folder = merged(folders)
        for data in args.data:
            check_out_folder(out, data)   # before the model load and the (slow) evaluation
        weights = [find_weights(w) for w in args.weights]
        model = load_models(weights)
        if args.int8 and not any(isinstance(m, ClipViTClassifier) for m in members(model)):
            raise EvaluationError('--int8 needs a ViT weights file: int8 is offered for the CLIP ViT only')
    except (FileNotFoundError, ValueError) as err:   # EvaluationError is a ValueError
        print(f'error: {err}', file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f'cannot write into --out {out}: {err.strerror or err}') from None

    results = {}
    try:
        for variant in ['plain'] + (['tta'] if args.tta else []) + (['int8'] if args.int8 else []):
            if variant == 'int8':   # in place (an ensemble: its ViT member), after the fp32 variants
                quantize_int8(model)
            results[variant] = evaluate(model, folder.items, batch_size=args.batch_size, tta=variant == 'tta',
                                        progress=None)
    except EvaluationError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    plain = results['plain']
    if 'int8' in results:   # the same photos, in the same order
        results['int8']['agreement_with_plain'] = accuracy(plain['probabilities'].argmax(1),
                                                           results['int8']['probabilities'].argmax(1))
    metrics = {
        'weights': _describe(model, weights),
        'ensemble': isinstance(model, Ensemble),
        'data': [str(data.resolve()) for data in args.data] if len(args.data) > 1 else str(args.data[0].resolve()),
        'classes': CLASSES,
        'n_files': plain['n_files'],
        'n_evaluated': plain['n_photos'],
        'n_failed': plain['n_failed'],
        'failed': plain['failed'],
        'unreadable_folders': [{'path': str(p), 'error': why} for p, why in folder.unreadable_folders],
        'n_skipped_non_images': len(folder.non_images),
        'skipped_non_images': [str(p) for p in folder.non_images],
        'missing_classes': folder.missing_classes,
        'batch_size': args.batch_size,
        'plain': summary_numbers(plain),
        'tta': summary_numbers(results['tta']) if 'tta' in results else None,
        'int8': summary_numbers(results['int8']) if 'int8' in results else None,
    }
    if len(folders) > 1:
        metrics['accuracy_by_folder'] = {variant: accuracy_by_folder(result, folders)
                                         for variant, result in results.items()}
    try:
        # ensure_ascii: a path that is not valid UTF-8 is written as a JSON \udcXX escape, read back losslessly
        (out / 'metrics.json').write_text(json.dumps(metrics, indent=2, ensure_ascii=True) + '\n', encoding='ascii')
        written = ['metrics.json'] + _write_outputs(out, results, ECE_BINS)
    except OSError as err:   # a full disk, a folder removed meanwhile: one line, not a traceback
        raise OutputError(f'cannot write into --out {out}: {err}') from None

    for path, why in folder.unreadable_folders:   # recorded in metrics.json too
        print(f'warning: {why}: its photos were not evaluated', file=sys.stderr)
    described = ', '.join(f'{Path(w["path"]).name} ({w["family"]}, {w["image_size"]} px, T={w["temperature"]:g})'
                          for w in metrics['weights'])
    print(f'weights: {"ensemble of " if metrics["ensemble"] else ""}{described}')
    print(f'data:    {" ".join(map(str, args.data))}: {plain["n_photos"]} photos evaluated, '
          f'{plain["n_failed"]} failed to decode, '
          f'{len(folder.non_images)} non-image file(s) skipped'
          + (f'; no photos of {", ".join(folder.missing_classes)}' if folder.missing_classes else ''))
    for variant, by_folder in metrics.get('accuracy_by_folder', {}).items():
        print(f'{variant} accuracy by folder: ' + ', '.join(f'{name} {v["accuracy"]:.4f} ({v["n_photos"]} photos)'
                                                             for name, v in by_folder.items()))
    print()
    print('\n'.join(_table(results)))
    if plain['failed']:
        print(f'\nnot evaluated ({plain["n_failed"]} file(s) that could not be decoded):')
        for f in plain['failed']:
            print(f'  {f["path"]}: {f["error"]}')
    print(f'\nwrote {out}/: {", ".join(written)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
