"""flowers_fastai.evaluate: the CLI end to end on a small real folder (shipped CNN, with and without TTA, fastai
not importable), its files agreeing with each other, bad files reported and never counted, the ensemble form,
and the metrics on a hand-computed example; and, as for predict's command line, hostile files and places:
non-UTF-8 file names written as their own bytes, an --out inside the data folder refused, earlier results replaced
with a note, spreadsheet formulas neutralised in every CSV, an --out that cannot be written, decoder errors of any
type as one failed row."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowers_fastai import evaluate as ev
from flowers_fastai.labels import CLASSES
from flowers_fastai.submit import load_cnn_model, load_ensemble, predict_proba

from .helpers import (BAD_RAW, GOOD_RAW, PHOTOS, PIL_OPEN_ERRORS, REPO, assert_formula_safe, exit_code, fs_name,
                      labelled, read_rows, real_photos)


SHIPPED = REPO / 'weights' / 'cnn_flowers.pth'
# the folder names as they come in the wild: normalised to the class names
FOLDER_NAMES = {'daisy': 'daisy', 'dandelion': 'Dandelion', 'rose': 'Roses', 'sunflower': 'sunflowers',
                'tulip': 'tulips'}


@pytest.fixture(scope='module')
def labelled_folder(tmp_path_factory) -> Path:
    """2 real photos per class (symlinks) under wild folder names, plus a corrupt .jpg, a text file, a hidden
    file and a top-level README (the last two ignored)."""
    root = tmp_path_factory.mktemp('eval_data') / 'smallset'
    for label, photos in real_photos(per_class=2).items():
        folder = root / FOLDER_NAMES[label]
        folder.mkdir(parents=True)
        for photo in photos:
            (folder / photo.name).symlink_to(photo)
    (root / 'daisy' / 'broken.jpg').write_bytes(b'this is not a JPEG at all' * 10)
    (root / 'tulips' / 'notes.txt').write_text('a text file among the photos\n')
    (root / 'Roses' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1')
    (root / 'README.txt').write_text('top-level files are ignored\n')
    return root


def check_files_agree(out: Path, suffix: str, metrics: dict, n_photos: int) -> None:
    """metrics.json's numbers are those of the confusion-matrix CSV; misclassified.csv holds exactly the
    off-diagonal photos; predictions.csv every photo evaluated."""
    rows = read_rows(out / f'confusion_matrix{suffix}.csv')
    assert rows[0][1:] == CLASSES and [r[0] for r in rows[1:]] == CLASSES
    cm = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert metrics['confusion_matrix'] == cm
    total, trace = sum(map(sum, cm)), sum(cm[i][i] for i in range(5))
    assert total == metrics['n_photos'] == n_photos                 # the bad files are counted nowhere
    assert metrics['accuracy'] == pytest.approx(trace / total)
    f1s = []
    for i, c in enumerate(CLASSES):
        row, col = sum(cm[i]), sum(cm[k][i] for k in range(5))
        stats = metrics['per_class'][c]
        assert stats['support'] == row and stats['predicted'] == col
        recall = cm[i][i] / row if row else 0.0
        precision = cm[i][i] / col if col else 0.0
        assert stats['recall'] == pytest.approx(recall) and stats['precision'] == pytest.approx(precision)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert stats['f1'] == pytest.approx(f1)
        if row or col:
            f1s.append(f1)
    assert metrics['macro_f1'] == pytest.approx(sum(f1s) / len(f1s))
    assert 0.0 <= metrics['ece'] <= 1.0

    wrong = read_rows(out / f'misclassified{suffix}.csv')
    assert wrong[0] == ['path', 'true', 'predicted'] + CLASSES
    assert len(wrong) - 1 == total - trace == metrics['n_misclassified']
    for path, true, predicted, *p in wrong[1:]:
        assert true != predicted and CLASSES[max(range(5), key=lambda k: float(p[k]))] == predicted
    predictions = read_rows(out / f'predictions{suffix}.csv')[1:]
    assert len(predictions) == n_photos
    assert not any(r[0].endswith(('broken.jpg', 'notes.txt')) for r in predictions)
    for path, true, predicted, *p in predictions:
        assert sum(map(float, p)) == pytest.approx(1.0, abs=1e-4)
        assert Path(path).parent.name == FOLDER_NAMES[true]


def assert_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
        assert img.format == 'PNG'


def test_cli_end_to_end_with_the_shipped_cnn_plain_and_tta_without_fastai(labelled_folder, tmp_path):
    if not SHIPPED.is_file():
        pytest.skip('weights/cnn_flowers.pth is absent')
    out = tmp_path / 'out'
    argv = ['--weights', 'weights/cnn_flowers.pth', '--data', str(labelled_folder), '--tta', '--out', str(out),
            '--batch-size', '4']
    code = ("import runpy, sys\n"
            "sys.modules['fastai'] = None  # `import fastai` fails: the evaluation must not need it\n"
            f"sys.argv = ['evaluate'] + {argv!r}\n"
            "runpy.run_module('flowers_fastai.evaluate', run_name='__main__', alter_sys=True)\n")
    run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['ensemble'] is False and metrics['weights'][0]['family'] == 'cnn'
    assert metrics['n_evaluated'] == 10 and metrics['n_files'] == 11
    assert metrics['n_failed'] == 1 and metrics['failed'][0]['path'].endswith('broken.jpg')
    assert metrics['n_skipped_non_images'] == 1 and metrics['skipped_non_images'][0].endswith('notes.txt')
    assert metrics['missing_classes'] == []
    for suffix, variant in (('', 'plain'), ('_tta', 'tta')):
        assert metrics[variant]['tta'] is (variant == 'tta')
        check_files_agree(out, suffix, metrics[variant], n_photos=10)
        assert_png(out / f'confusion_matrix{suffix}.png')
    assert_png(out / 'reliability.png')
    assert read_rows(out / 'failed.csv')[1][0].endswith('broken.jpg')
    # the shipped model is far better than chance on real photos (most of them it was trained on)
    assert metrics['plain']['accuracy'] >= 0.6 and metrics['tta']['accuracy'] >= 0.6

    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.split() == ['plain', 'TTA'])
    assert header
    accuracy = next(line for line in lines if line.startswith('accuracy')).split()
    assert [float(v) for v in accuracy[1:]] == pytest.approx([metrics['plain']['accuracy'],
                                                              metrics['tta']['accuracy']], abs=1e-4)
    assert 'broken.jpg' in run.stdout and '1 failed to decode' in run.stdout and '1 non-image' in run.stdout


def test_evaluate_gives_the_delivery_probabilities_and_consistent_numbers(labelled_folder, tiny_cnn_file):
    model = load_cnn_model(tiny_cnn_file)
    folder = ev.scan_labelled_folder(labelled_folder)
    assert {label for _, label in folder.items} == set(CLASSES) and len(folder.items) == 11
    result = ev.evaluate(model, folder.items, batch_size=3, progress=False)
    assert result['n_files'] == 11 and result['n_failed'] == 1 and result['n_photos'] == 10
    probabilities, targets = result['probabilities'], result['targets']
    assert probabilities.shape == (10, 5) and targets.tolist() == sorted(targets.tolist())   # folders in class order
    for path, p in zip(result['paths'][::3], probabilities[::3]):
        expected = predict_proba(model, path)
        assert p.tolist() == pytest.approx([expected[c] for c in CLASSES], abs=1e-5)
    predicted = probabilities.argmax(1)
    assert result['accuracy'] == pytest.approx(float((predicted == targets).double().mean()))
    assert len(result['misclassified']) == int((predicted != targets).sum()) == result['n_misclassified']
    confidences = [m['probabilities'][m['predicted']] for m in result['misclassified']]
    assert confidences == sorted(confidences, reverse=True)   # most confident mistake first
    # the labels may be class indices or folder spellings too
    sub = folder.items[:4]
    again = ev.evaluate(model, [(p, CLASSES.index(lab)) for p, lab in sub], progress=False)
    assert again['targets'].tolist() == [CLASSES.index(lab) for p, lab in sub if p.name != 'broken.jpg']
    assert ev.evaluate(model, [(folder.items[0][0], 'Roses')], progress=False)['targets'].tolist() == [2]
    with pytest.raises(ValueError, match='orchid'):
        ev.evaluate(model, [(folder.items[0][0], 'orchid')], progress=False)


def test_classification_metrics_of_a_hand_computed_example():
    targets = torch.tensor([0, 0, 1, 1, 2])
    predicted = [0, 1, 1, 1, 0]            # rose is never predicted; sunflower and tulip appear nowhere
    probabilities = torch.full((5, 5), 0.1)
    probabilities[range(5), predicted] = 0.6
    m = ev.classification_metrics(probabilities, targets)
    assert m['confusion_matrix'] == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [0] * 5]
    assert m['accuracy'] == pytest.approx(3 / 5)
    assert m['per_class']['daisy'] == pytest.approx({'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'support': 2,
                                                     'predicted': 2})
    assert m['per_class']['dandelion'] == pytest.approx({'precision': 2 / 3, 'recall': 1.0, 'f1': 0.8,
                                                         'support': 2, 'predicted': 3})
    assert m['per_class']['rose'] == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0, 'support': 1, 'predicted': 0}
    assert m['macro_f1'] == pytest.approx((0.5 + 0.8 + 0.0) / 3)      # absent classes do not count
    assert m['macro_f1_classes'] == ['daisy', 'dandelion', 'rose']
    assert m['ece'] == pytest.approx(0.0, abs=1e-6)                    # confidence 0.6, accuracy 3/5
    assert m['nll'] == pytest.approx(-(3 * torch.tensor(0.6).log() + 2 * torch.tensor(0.1).log()).item() / 5)


def test_clear_errors_for_folders_and_weights_that_cannot_be_evaluated(tmp_path, capsys, tiny_cnn_file):
    data, out = tmp_path / 'data', tmp_path / 'out'
    (data / 'rose').mkdir(parents=True)
    (data / 'rose' / 'a.jpg').write_bytes(b'x')
    (data / 'orchid').mkdir()

    def run(weights=tiny_cnn_file) -> str:
        assert ev.main(['--weights', str(weights), '--data', str(data), '--out', str(out)]) == 2
        return capsys.readouterr().err

    assert 'orchid' in run()
    shutil.rmtree(data / 'orchid')
    (data / 'rose' / 'a.jpg').unlink()
    (data / 'rose' / 'a.txt').write_text('no photo here')
    assert 'no image files' in run()
    (data / 'rose' / 'a.jpg').write_bytes(b'not an image')        # every photo fails: an error, no crash
    assert 'none of the 1 file(s) could be classified' in run()
    assert 'nope.pth not found' in run(tmp_path / 'nope.pth')
    with pytest.raises(ev.EvaluationError, match='no class folders'):
        ev.scan_labelled_folder(data / 'rose')


def test_family_comes_from_the_sidecar_else_from_the_keys(tmp_path, tiny_cnn_file, tiny_vit_file):
    assert ev.load_models([tiny_cnn_file]).flowers_family == 'cnn'
    assert ev.load_models([tiny_vit_file]).flowers_family == 'vit'
    for source, family, sidecar in ((tiny_cnn_file, 'cnn', {'image_size': 32}),
                                    (tiny_vit_file, 'vit', {'quick_gelu': True, 'head_width': 32})):
        copy = tmp_path / f'no_family_{family}.pth'
        shutil.copy(source, copy)
        copy.with_suffix('.json').write_text(json.dumps(sidecar))
        assert getattr(ev.load_models([copy]), 'flowers_family') == family
    wrong = tmp_path / 'says_vit.pth'                  # a sidecar that names the other family: a clear error
    shutil.copy(tiny_cnn_file, wrong)
    wrong.with_suffix('.json').write_text(json.dumps({'family': 'vit'}))
    # the wording is submit's (its loader says which file and which family); evaluate only passes it on
    with pytest.raises(ValueError, match=r'says_vit\.(pth|json).*(CLIP ViT|ConvNeXt|CNN)'):
        ev.load_models([wrong])
    other = tmp_path / 'other.pth'
    torch.save({'linear.weight': torch.zeros(5, 3)}, other)
    with pytest.raises(ValueError, match='neither'):   # submit's contract: ValueError (EvaluationError is one)
        ev.load_models([other])


def test_two_weights_files_evaluate_their_ensemble(labelled_folder, tmp_path, monkeypatch, tiny_cnn_file,
                                                  tiny_vit_file):
    monkeypatch.chdir(tmp_path)   # the default output folder is under the cwd
    argv = ['--weights', str(tiny_cnn_file), '--weights', str(tiny_vit_file), '--data', str(labelled_folder)]
    assert ev.main(argv) == 0
    out = tmp_path / 'eval' / f'cnn_flowers+vit_flowers-{labelled_folder.name}'
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['ensemble'] is True and [w['family'] for w in metrics['weights']] == ['cnn', 'vit']
    assert metrics['tta'] is None and not (out / 'confusion_matrix_tta.csv').exists()
    check_files_agree(out, '', metrics['plain'], n_photos=10)
    # the numbers are those of the delivery ensemble
    ensemble = load_ensemble(tiny_cnn_file, tiny_vit_file)
    path, _, _, *p = read_rows(out / 'predictions.csv')[1]
    expected = predict_proba(ensemble, path)
    assert [float(v) for v in p] == pytest.approx([expected[c] for c in CLASSES], abs=1e-5)


def test_int8_row_reports_the_vit_accuracy_beside_fp32_and_their_agreement(labelled_folder, tmp_path,
                                                                           tiny_cnn_file, tiny_vit_file, capsys):
    out = tmp_path / 'int8'
    assert ev.main(['--weights', str(tiny_vit_file), '--data', str(labelled_folder), '--int8', '--out', str(out)]) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['int8']['n_photos'] == metrics['plain']['n_photos'] == 10
    plain = read_rows(out / 'predictions.csv')[1:]
    int8 = read_rows(out / 'predictions_int8.csv')[1:]
    assert [r[0] for r in plain] == [r[0] for r in int8]
    same = sum(a[2] == b[2] for a, b in zip(plain, int8)) / len(plain)
    assert metrics['int8']['agreement_with_plain'] == pytest.approx(same)
    assert [r[3:] for r in plain] != [r[3:] for r in int8]      # int8 probabilities: close, not the same
    assert 'same class as plain' in capsys.readouterr().out
    # the CNN has no int8 path: a clear error, exit status 2
    assert ev.main(['--weights', str(tiny_cnn_file), '--data', str(labelled_folder), '--int8',
                    '--out', str(tmp_path / 'cnn')]) == 2
    assert 'int8 is offered for the CLIP ViT only' in capsys.readouterr().err


def test_metrics_module_counts_as_by_hand():
    """flowers_fastai.metrics, the one place for accuracy, per-class accuracy, the confusion matrix and NLL
    (ECE: calibration): hand-computed values, and training's report convention (None, not NaN, for 0/0)."""
    from flowers_fastai import metrics
    targets, predicted = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2]
    cm = metrics.confusion_matrix(targets, predicted)
    assert cm.tolist() == [[1, 1, 0, 0, 0], [0, 2, 0, 0, 0], [1, 0, 2, 0, 0], [0] * 5, [0] * 5]
    assert metrics.accuracy(targets, predicted) == pytest.approx(5 / 7)
    overall, n, per_class = metrics.accuracy_by_class(cm)
    assert overall == pytest.approx(5 / 7) and n == 7
    assert per_class == pytest.approx({'daisy': 0.5, 'dandelion': 1.0, 'rose': 2 / 3, 'sunflower': None,
                                       'tulip': None})
    assert metrics.accuracy_by_class([[0] * 5] * 5) == (None, 0, dict.fromkeys(CLASSES))
    probabilities = torch.tensor([[0.7, 0.3, 0, 0, 0], [1e-13, 1 - 1e-13, 0, 0, 0]], dtype=torch.float64)
    assert metrics.nll(probabilities, torch.tensor([0, 0])) == pytest.approx((-torch.tensor(0.7).log().item()
                                                                             - torch.tensor(1e-12).log().item()) / 2)
    assert ev.classification_metrics is metrics.classification_metrics and ev.ECE_BINS == metrics.ECE_BINS == 15


def test_several_folders_are_evaluated_together_with_each_folders_accuracy(labelled_folder, tmp_path, capsys,
                                                                          tiny_cnn_file):
    second = tmp_path / 'second'
    for c in CLASSES:
        (second / c).mkdir(parents=True)
        Image.new('RGB', (40, 30), (40 * CLASSES.index(c), 90, 200)).save(second / c / 'a.png')
    out = tmp_path / 'out'
    assert ev.main(['--weights', str(tiny_cnn_file), '--data', str(labelled_folder), str(second),
                    '--out', str(out)]) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    by_folder = metrics['accuracy_by_folder']['plain']
    assert metrics['data'] == [str(labelled_folder.resolve()), str(second.resolve())]
    assert {k: v['n_photos'] for k, v in by_folder.items()} == {'smallset': 10, 'second': 5}   # broken.jpg counts nowhere
    model = load_cnn_model(tiny_cnn_file)
    for name, folder in (('smallset', labelled_folder), ('second', second)):
        items = [(p, label) for p, label in ev.scan_labelled_folder(folder).items if p.name != 'broken.jpg']
        right = sum(max(predict_proba(model, p), key=predict_proba(model, p).get) == label for p, label in items)
        assert by_folder[name]['accuracy'] == pytest.approx(right / len(items))
    assert metrics['plain']['n_photos'] == 15 and 'accuracy by folder: smallset' in capsys.readouterr().out
    assert ev.default_out([tiny_cnn_file], [labelled_folder, second]).name == 'cnn_flowers-smallset+second'


# ------------------------------------------------------------------------------------------ hostile files and places
def test_evaluate_writes_non_utf8_file_names_as_their_own_bytes(weights, tmp_path, capsysbinary):
    data = labelled(tmp_path / 'data', {'rose': [(fs_name(GOOD_RAW), PHOTOS[0]), ('r.jpg', PHOTOS[1])],
                                        'daisy': [(fs_name(BAD_RAW), b'not an image'), ('d.jpg', PHOTOS[2])]})
    out = tmp_path / 'out'
    assert exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out]) == 0
    stdout, _ = capsysbinary.readouterr()
    good, bad = data / 'rose' / fs_name(GOOD_RAW), data / 'daisy' / fs_name(BAD_RAW)
    assert os.fsencode(bad) in stdout                                 # the summary's list of failed files
    assert str(good) in [row[0] for row in read_rows(out / 'predictions.csv')[1:]]
    assert [row[0] for row in read_rows(out / 'failed.csv')[1:]] == [str(bad)]
    metrics = json.loads((out / 'metrics.json').read_text(encoding='ascii'))   # JSON escapes them: still lossless
    assert metrics['failed'][0]['path'] == str(bad)
    misclassified = read_rows(out / 'misclassified.csv')
    assert misclassified[0][0] == 'path'


def test_evaluate_refuses_an_out_inside_the_data_folder_and_leaves_the_photos(weights, tmp_path, capsys):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0])], 'daisy': [('d.jpg', PHOTOS[1])]})
    with Image.open(PHOTOS[2]) as img:      # a photo whose name evaluate writes: it must survive
        img.save(data / 'rose' / 'reliability.png')
    before = (data / 'rose' / 'reliability.png').read_bytes()
    code = exit_code(ev.main, ['--weights', weights, '--data', data, '--out', data / 'rose'])
    err = capsys.readouterr().err
    assert code == 2 and 'inside the data folder' in err and 'Traceback' not in err
    assert (data / 'rose' / 'reliability.png').read_bytes() == before
    assert sorted(p.name for p in (data / 'rose').iterdir()) == ['r.jpg', 'reliability.png']


def test_evaluate_says_when_it_replaces_earlier_results(weights, tmp_path, capsys):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0])]})
    out = tmp_path / 'out'
    assert exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out]) == 0
    assert 'replacing' not in capsys.readouterr().err
    assert exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out]) == 0
    assert 'replacing the earlier results' in capsys.readouterr().err


def test_every_csv_evaluate_writes_neutralises_cells_that_start_a_formula(weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = labelled(tmp_path / '=data', {'rose': [('=r.jpg', PHOTOS[0]), ('-r2.jpg', PHOTOS[1])],
                                         'daisy': [('@d.jpg', PHOTOS[2]), ('+broken.jpg', b'not an image')]})
    out = tmp_path / 'out'
    assert exit_code(ev.main, ['--weights', weights, '--data', '=data', '--out', out, '--tta']) == 0
    written = sorted(out.glob('*.csv'))
    assert {p.name for p in written} >= {'predictions.csv', 'misclassified.csv', 'failed.csv',
                                         'confusion_matrix.csv', 'predictions_tta.csv'}
    for path in written:
        assert_formula_safe(read_rows(path))
    assert read_rows(out / 'failed.csv')[1][0] == "'" + str(Path('=data') / 'daisy' / '+broken.jpg')
    assert data.is_dir()


@pytest.mark.parametrize('kind', ['a file', 'under a file', 'a full disk midway'])
def test_an_evaluate_out_that_cannot_be_written_is_one_line_and_a_non_zero_exit(kind, weights, tmp_path, capsys,
                                                                                monkeypatch):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0])]})
    blocker = tmp_path / 'a_file.txt'
    blocker.write_text('a file, not a folder\n')
    out = {'a file': blocker, 'under a file': blocker / 'out', 'a full disk midway': tmp_path / 'out'}[kind]
    if kind == 'a full disk midway':
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(ev, 'write_confusion_png', full)
    code = exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out])
    err = capsys.readouterr().err
    assert code not in (0, 1), err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error:') and str(out) in err, err
    assert blocker.read_text() == 'a file, not a folder\n'


@pytest.mark.parametrize('hostile_decoder', PIL_OPEN_ERRORS[:2], indirect=True, ids=lambda e: type(e).__name__)
def test_a_decoder_error_of_any_type_is_one_failed_row_of_evaluate(hostile_decoder, weights, tmp_path):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0]), ('r_hostile.jpg', PHOTOS[1])],
                                        'daisy': [('d.jpg', PHOTOS[2])]})
    out = tmp_path / 'out'
    assert exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out, '--batch-size', '2']) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n_evaluated'] == 2 and metrics['n_failed'] == 1
    assert [Path(row[0]).name for row in read_rows(out / 'failed.csv')[1:]] == ['r_hostile.jpg']
