"""The command lines (`predict`, `evaluate`) against hostile files and places (issue 12): non-UTF-8 file names,
an output that is one of the inputs, spreadsheet formulas in cells, a reader that stops early, an output that
cannot be written, and decoder errors of unexpected types. Each failure is one line or one row, never a
traceback; what is written is lossless."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from flowers_fastai import evaluate as ev
from flowers_fastai.labels import CLASSES
from flowers_fastai.predict import main as predict_main

from .conftest import EXAMPLES, REPO

PHOTOS = sorted(EXAMPLES.glob('*.jpg'))
# what a spreadsheet runs as a formula at the start of a cell (OWASP, CSV injection)
FORMULA_TRIGGERS = ('=', '+', '-', '@', '\t', '\r')


def exit_code(main, argv) -> int:
    """main's exit status, whether returned or raised as SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1


def read_rows(path: Path) -> list[list[str]]:
    """A CSV written with the output rule: the file system's bytes (surrogateescape) give the paths back."""
    with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
        return list(csv.reader(f))


def fs_name(raw: bytes) -> str:
    """A file name from its bytes, as Python sees it (os.fsdecode: undecodable bytes become surrogates)."""
    return os.fsdecode(raw)


@pytest.fixture
def weights(tiny_cnn_file, tmp_path) -> Path:
    """A private copy of the tiny CNN and its sidecar: a test may try to overwrite it."""
    folder = tmp_path / 'weights'
    folder.mkdir()
    shutil.copy(tiny_cnn_file, folder / 'cnn_flowers.pth')
    shutil.copy(tiny_cnn_file.with_suffix('.json'), folder / 'cnn_flowers.json')
    return folder / 'cnn_flowers.pth'


def labelled(root: Path, files: dict[str, list[tuple[str, bytes | Path]]]) -> Path:
    """root/<class>/<name>: a copy of a photo (Path) or the bytes given."""
    for label, entries in files.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name, content in entries:
            target = root / label / name
            if isinstance(content, Path):
                shutil.copy(content, target)
            else:
                target.write_bytes(content)
    return root


# ------------------------------------------------------------------------------------- non-UTF-8 file names
GOOD_RAW, BAD_RAW = b'\xff\xfe.jpg', b'\xfe\xff-broken.jpg'   # not UTF-8: os.fsdecode gives surrogates


def test_predict_writes_non_utf8_file_names_as_their_own_bytes(weights, tmp_path, capsysbinary):
    folder = tmp_path / 'photos'
    folder.mkdir()
    good, bad, plain = folder / fs_name(GOOD_RAW), folder / fs_name(BAD_RAW), folder / 'plain.jpg'
    shutil.copy(PHOTOS[0], good)
    shutil.copy(PHOTOS[1], plain)
    bad.write_bytes(b'not an image')
    out = tmp_path / 'predictions.csv'
    assert exit_code(predict_main, [folder, '--weights', weights, '--csv', out, '--no-progress']) == 1
    stdout, stderr = capsysbinary.readouterr()
    assert os.fsencode(good) + b'\t' in stdout and os.fsencode(plain) + b'\t' in stdout   # the real bytes
    assert os.fsencode(bad) + b'\tERROR' in stderr
    rows = {row[0]: row for row in read_rows(out)[1:]}
    assert set(rows) == {str(good), str(bad), str(plain)}          # read back, the very paths
    assert rows[str(good)][1] in CLASSES and rows[str(bad)][1] == '' and rows[str(bad)][-1]
    assert Path(rows[str(good)][0]).read_bytes() == PHOTOS[0].read_bytes()   # usable as a path


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


# ---------------------------------------------------------------------------------- outputs that are inputs
@pytest.mark.parametrize('kind', ['same path', 'another spelling', 'symlink', 'hard link', 'weights', 'sidecar'])
def test_csv_that_is_one_of_the_inputs_is_refused_and_the_input_untouched(kind, weights, tmp_path, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    photo = folder / 'a.jpg'
    shutil.copy(PHOTOS[0], photo)
    before = {p: p.read_bytes() for p in (photo, weights, weights.with_suffix('.json'))}
    target = {'same path': photo, 'another spelling': folder / '..' / 'photos' / '.' / 'a.jpg',
              'symlink': tmp_path / 'link.csv', 'hard link': tmp_path / 'hard.csv', 'weights': weights,
              'sidecar': weights.with_suffix('.json')}[kind]
    if kind == 'symlink':
        target.symlink_to(photo)
    elif kind == 'hard link':
        os.link(photo, target)
    code = exit_code(predict_main, [folder, '--weights', weights, '--csv', target, '--no-progress'])
    err = capsys.readouterr().err
    assert code != 0 and code != 1                  # not "a photo failed": the run was refused
    assert len(err.strip().splitlines()) == 1 and 'input' in err and 'Traceback' not in err
    for path, content in before.items():
        assert path.read_bytes() == content, path


def test_replacing_an_existing_csv_says_so_on_stderr(weights, tmp_path, capsys):
    out = tmp_path / 'old.csv'
    out.write_text('an earlier run\n')
    assert exit_code(predict_main, [PHOTOS[0], '--weights', weights, '--csv', out, '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'replacing' in err and str(out) in err
    assert read_rows(out)[0] == ['path', 'class', *CLASSES, 'error']


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


# ---------------------------------------------------------------------------------- spreadsheet formulas
FORMULA_NAMES = ['=1+2.jpg', '+SUM(1).jpg', '-3.jpg', '@cmd.jpg', '\tTAB.jpg', '\rCR.jpg', "'quoted.jpg",
                 '=cmd|calc!A0.jpg']


def assert_formula_safe(rows: list[list[str]]) -> None:
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_TRIGGERS), (cell, row)


def test_predicts_csv_neutralises_cells_that_start_a_formula(weights, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(FORMULA_NAMES):
        shutil.copy(PHOTOS[i % len(PHOTOS)], folder / name)
    (folder / '=broken.jpg').write_bytes(b'not an image')
    monkeypatch.chdir(folder)   # relative paths: the path cells start with the names
    out = tmp_path / 'predictions.csv'
    assert exit_code(predict_main, ['--weights', weights, '--csv', out, '--no-progress', '--',   # '-3.jpg' is no option
                                    *FORMULA_NAMES, '=broken.jpg']) == 1
    rows = read_rows(out)
    assert_formula_safe(rows)
    paths = [row[0] for row in rows[1:]]
    assert paths == ["'" + name for name in FORMULA_NAMES + ['=broken.jpg']]   # one leading ' to drop
    assert all(row[1] in CLASSES for row in rows[1:-1])


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


# --------------------------------------------------------------------- a reader that stops, unwritable outputs
def test_predict_piped_into_a_reader_that_stops_early_ends_quietly(weights, tmp_path):
    """`python -m flowers_fastai.predict ... | head -1`: more lines than a pipe holds (64 KB), the reader
    closes after the first one; no BrokenPipeError traceback, a non-zero status."""
    folder = tmp_path / 'many'
    folder.mkdir()
    for i in range(300):   # ~300 lines of ~330 bytes: more than the pipe's buffer
        (folder / f'{i:03d}_{"x" * 200}.jpg').symlink_to(PHOTOS[i % len(PHOTOS)])
    run = subprocess.Popen([sys.executable, '-m', 'flowers_fastai.predict', str(folder), '--weights', str(weights),
                            '--batch-size', '8'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = run.stdout.readline()
    run.stdout.close()          # as `head -1` does
    _, stderr = run.communicate(timeout=240)
    assert first.rstrip().split(b'\t')[1].decode() in CLASSES
    assert run.returncode in (1, 141), stderr.decode(errors='replace')
    assert b'Traceback' not in stderr and b'BrokenPipeError' not in stderr and b'Exception ignored' not in stderr


class ClosedPipe(io.TextIOBase):
    """A stdout whose reader is gone: every write raises BrokenPipeError, as a pipe after `head -1` exits."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, 'Broken pipe')

    def fileno(self):
        raise io.UnsupportedOperation('no file descriptor here')


@pytest.mark.parametrize('command', ['predict', 'evaluate'])
def test_a_closed_stdout_is_a_quiet_non_zero_exit(command, weights, tmp_path, monkeypatch, capsys):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0])]})
    monkeypatch.setattr(sys, 'stdout', ClosedPipe())
    if command == 'predict':
        code = exit_code(predict_main, [data, '--weights', weights, '--no-progress'])
    else:
        code = exit_code(ev.main, ['--weights', weights, '--data', data, '--out', tmp_path / 'out'])
    assert code in (1, 141)
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('kind', ['under a file', 'deeper under a file', 'a folder', 'a full disk'])
def test_a_csv_that_cannot_be_written_is_one_line_and_a_non_zero_exit(kind, weights, tmp_path, capsys):
    blocker = tmp_path / 'a_file.txt'
    blocker.write_text('a file, not a folder\n')
    if kind == 'a full disk' and not Path('/dev/full').exists():
        pytest.skip('/dev/full is absent')
    target = {'under a file': blocker / 'out.csv', 'deeper under a file': blocker / 'sub' / 'out.csv',
              'a folder': tmp_path, 'a full disk': Path('/dev/full')}[kind]
    code = exit_code(predict_main, [PHOTOS[0], '--weights', weights, '--csv', target, '--no-progress'])
    err = capsys.readouterr().err
    assert code not in (0, 1), err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error:') and str(target) in err, err


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


# ----------------------------------------------------------------------------- decoder errors of any type
DECODER_ERRORS = [KeyError('bad EXIF tag'), TypeError('unsupported operand'), ZeroDivisionError('division by zero'),
                  RuntimeError('decoder crashed'), IndexError('tuple index out of range')]


@pytest.fixture
def hostile_decoder(monkeypatch, request):
    """PIL raises `request.param` for any file whose name holds 'hostile' (as PIL's plugins can, on crafted
    files, with errors outside the documented ValueError / FileNotFoundError)."""
    real_open = Image.open

    def open_(fp, *args, **kwargs):
        if 'hostile' in str(fp):
            raise request.param
        return real_open(fp, *args, **kwargs)
    monkeypatch.setattr(Image, 'open', open_)
    return request.param


@pytest.mark.parametrize('hostile_decoder', DECODER_ERRORS, indirect=True, ids=lambda e: type(e).__name__)
def test_a_decoder_error_of_any_type_is_one_error_row_of_predict(hostile_decoder, weights, tmp_path, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(['a.jpg', 'b_hostile.jpg', 'c.jpg', 'd.jpg']):
        shutil.copy(PHOTOS[i], folder / name)
    out = tmp_path / 'predictions.csv'
    code = exit_code(predict_main, [folder, '--weights', weights, '--csv', out, '--batch-size', '3',
                                    '--no-progress'])
    captured = capsys.readouterr()
    assert code == 1
    rows = {Path(row[0]).name: row for row in read_rows(out)[1:]}
    assert list(rows) == ['a.jpg', 'b_hostile.jpg', 'c.jpg', 'd.jpg']
    assert rows['b_hostile.jpg'][1] == '' and rows['b_hostile.jpg'][-1]      # its error, and no class
    assert all(rows[n][1] in CLASSES and rows[n][-1] == '' for n in ('a.jpg', 'c.jpg', 'd.jpg'))
    assert 'b_hostile.jpg\tERROR' in captured.err and len(captured.out.splitlines()) == 3


@pytest.mark.parametrize('hostile_decoder', DECODER_ERRORS[:2], indirect=True, ids=lambda e: type(e).__name__)
def test_a_decoder_error_of_any_type_is_one_failed_row_of_evaluate(hostile_decoder, weights, tmp_path):
    data = labelled(tmp_path / 'data', {'rose': [('r.jpg', PHOTOS[0]), ('r_hostile.jpg', PHOTOS[1])],
                                        'daisy': [('d.jpg', PHOTOS[2])]})
    out = tmp_path / 'out'
    assert exit_code(ev.main, ['--weights', weights, '--data', data, '--out', out, '--batch-size', '2']) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n_evaluated'] == 2 and metrics['n_failed'] == 1
    assert [Path(row[0]).name for row in read_rows(out / 'failed.csv')[1:]] == ['r_hostile.jpg']
