"""`python -m flowers_fastai.predict`: batches over files and folders, a CSV row per file, bad files as rows, the
thread count; and hostile files and places: non-UTF-8 file names written as their own bytes, a CSV that is one of
the inputs refused, spreadsheet formulas neutralised, a reader that stops early or a closed stdout (evaluate's
command line too), a CSV that cannot be written, decoder errors of any type. Each failure is one line or one row,
never a traceback; what is written is lossless."""
from __future__ import annotations

import csv
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowers_fastai import evaluate as ev
from flowers_fastai.labels import CLASSES
from flowers_fastai.predict import main
from flowers_fastai.submit import load_cnn_model, predict_proba

from .helpers import (EXAMPLES, GOOD_RAW, BAD_RAW, PHOTOS, PIL_OPEN_ERRORS, REPO, assert_formula_safe, exit_code,
                      fs_name, labelled, read_rows)


def test_csv_has_one_row_per_file_with_probabilities_and_bad_files_as_error_rows(tiny_cnn_file, tmp_path, capsys):
    photos = sorted(EXAMPLES.glob('*.jpg'))
    nested = tmp_path / 'photos' / 'deeper'
    nested.mkdir(parents=True)
    for p in photos[:3]:
        shutil.copy(p, nested / p.name)
    (tmp_path / 'photos' / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    (tmp_path / 'photos' / 'notes.txt').write_text('not an image: skipped by the folder scan')
    out = tmp_path / 'out' / 'predictions.csv'
    code = main([str(tmp_path / 'photos'), str(photos[3]), '--weights', str(tiny_cnn_file), '--csv', str(out),
                 '--batch-size', '2'])
    assert code == 1                                           # one file failed; the others were classified
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 4 and 'broken.jpg\tERROR' in captured.err
    rows = list(csv.DictReader(out.open()))
    assert [r['path'] for r in rows] == [str(tmp_path / 'photos' / 'broken.jpg'),
                                        *(str(nested / p.name) for p in photos[:3]), str(photos[3])]
    assert rows[0]['class'] == '' and 'ValueError' in rows[0]['error'] and rows[0]['daisy'] == ''
    model = load_cnn_model(tiny_cnn_file)
    for row in rows[1:]:
        probs = {c: float(row[c]) for c in CLASSES}
        assert row['error'] == '' and row['class'] == max(probs, key=probs.get)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert probs == pytest.approx(predict_proba(model, row['path']), abs=1e-5)   # batching changes nothing


def test_ensemble_without_a_vit_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([str(EXAMPLES), '--model', 'ensemble']) == 2   # the model cannot load: 2, not "a photo failed"
    assert 'vit_flowers.pth' in capsys.readouterr().err


def test_int8_runs_the_vit_in_int8_and_is_refused_for_the_cnn(tiny_cnn_file, tiny_vit_file, tmp_path, capsys):
    from flowers_fastai.predict import load_chosen_model
    from flowers_fastai.inference_nets import Int8Linear
    out = tmp_path / 'int8.csv'
    assert main([str(EXAMPLES), '--model', 'vit', '--weights', str(tiny_vit_file), '--int8', '--csv', str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == len(list(EXAMPLES.glob('*.jpg')))
    ensemble = load_chosen_model('ensemble', str(tiny_cnn_file), str(tiny_vit_file), int8=True)
    assert isinstance(ensemble.members[1].visual.transformer.resblocks[0].attn.packed[0], Int8Linear)
    assert main([str(EXAMPLES), '--weights', str(tiny_cnn_file), '--int8']) == 2
    assert 'ViT only' in capsys.readouterr().err


@pytest.mark.parametrize('broken', ['missing', 'not a torch file'])
def test_a_model_that_cannot_load_is_exit_status_2_not_1(broken, tmp_path, capsys):
    """1 means "some photo failed"; a model that cannot load classified nothing (`evaluate` says 2 too)."""
    weights = tmp_path / 'cnn_flowers.pth'
    if broken != 'missing':
        weights.write_bytes(b'no torch file')
    assert main([str(EXAMPLES), '--weights', str(weights), '--no-progress']) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and captured.err.startswith('error: ') and str(weights) in captured.err


def test_a_tab_or_newline_in_a_file_name_cannot_forge_output_lines(tiny_cnn_file, tmp_path, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    forged = folder / 'x.jpg\tdaisy\nevil.jpg'
    shutil.copy(sorted(EXAMPLES.glob('*.jpg'))[0], forged)
    (folder / 'broken\nname.jpg').write_bytes(b'not a jpeg')
    assert main([str(folder), '--weights', str(tiny_cnn_file), '--no-progress']) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(folder / 'x.jpg\\tdaisy\\nevil.jpg') + '\t')
    assert lines[0].split('\t')[1] in CLASSES and len(lines[0].split('\t')) == 2
    assert len(captured.err.splitlines()) == 1 and 'broken\\nname.jpg\tERROR' in captured.err


@pytest.mark.parametrize('option, load, expected', [(['--threads', '1'], 0.0, 1), ([], 9.0, 1), ([], 0.0, 'default'),
                                                    (['--threads', 'auto'], 1.2, 'cores - 1')])
def test_threads_default_to_the_cores_the_load_average_leaves_idle(option, load, expected, monkeypatch, tmp_path):
    """On a CPU another job keeps busy, 2 threads took ~1.3 s a prediction against ~44 ms on 1 (docs/speed.md):
    the default takes the cores the load average shows idle, at least one. No timing here: the choice only."""
    import os

    import torch

    from flowers_fastai import predict as cli
    default, seen = torch.get_num_threads(), []
    monkeypatch.setattr(os, 'getloadavg', lambda: (load, load, load))
    monkeypatch.setattr(cli, 'load_chosen_model', lambda *args: None)
    monkeypatch.setattr(cli, 'classify_files', lambda *args, **kwargs: seen.append(torch.get_num_threads()) or [])
    assert main([str(EXAMPLES), '--no-progress', *option]) == 0
    cores = os.cpu_count()
    want = {'default': default, 'cores - 1': max(1, min(default, cores - 1))}.get(expected, expected)
    assert seen == [want]
    assert torch.get_num_threads() == default   # main() leaves the caller's setting as it was


def test_threads_option_refuses_what_is_no_thread_count():
    for bad in ('0', '-2', 'many'):
        with pytest.raises(SystemExit) as stop:
            main([str(EXAMPLES), '--threads', bad])
        assert stop.value.code == 2


# ------------------------------------------------------------------------------------------ non-UTF-8 file names
def test_predict_writes_non_utf8_file_names_as_their_own_bytes(weights, tmp_path, capsysbinary):
    folder = tmp_path / 'photos'
    folder.mkdir()
    good, bad, plain = folder / fs_name(GOOD_RAW), folder / fs_name(BAD_RAW), folder / 'plain.jpg'
    shutil.copy(PHOTOS[0], good)
    shutil.copy(PHOTOS[1], plain)
    bad.write_bytes(b'not an image')
    out = tmp_path / 'predictions.csv'
    assert exit_code(main, [folder, '--weights', weights, '--csv', out, '--no-progress']) == 1
    stdout, stderr = capsysbinary.readouterr()
    assert os.fsencode(good) + b'\t' in stdout and os.fsencode(plain) + b'\t' in stdout   # the real bytes
    assert os.fsencode(bad) + b'\tERROR' in stderr
    rows = {row[0]: row for row in read_rows(out)[1:]}
    assert set(rows) == {str(good), str(bad), str(plain)}          # read back, the very paths
    assert rows[str(good)][1] in CLASSES and rows[str(bad)][1] == '' and rows[str(bad)][-1]
    assert Path(rows[str(good)][0]).read_bytes() == PHOTOS[0].read_bytes()   # usable as a path


# ------------------------------------------------------------------------------------ outputs that are inputs, or exist
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
    code = exit_code(main, [folder, '--weights', weights, '--csv', target, '--no-progress'])
    err = capsys.readouterr().err
    assert code != 0 and code != 1                  # not "a photo failed": the run was refused
    assert len(err.strip().splitlines()) == 1 and 'input' in err and 'Traceback' not in err
    for path, content in before.items():
        assert path.read_bytes() == content, path


def test_replacing_an_existing_csv_says_so_on_stderr(weights, tmp_path, capsys):
    out = tmp_path / 'old.csv'
    out.write_text('an earlier run\n')
    assert exit_code(main, [PHOTOS[0], '--weights', weights, '--csv', out, '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'replacing' in err and str(out) in err
    assert read_rows(out)[0] == ['path', 'class', *CLASSES, 'error']


def test_csv_through_a_symlink_names_the_file_it_replaces(tiny_cnn_file, tmp_path, capsys):
    target = tmp_path / 'real.csv'
    target.write_text('old')
    link = tmp_path / 'link.csv'
    link.symlink_to(target)
    assert main([str(sorted(EXAMPLES.glob('*.jpg'))[0]), '--weights', str(tiny_cnn_file), '--csv', str(link),
                 '--no-progress']) == 0
    err = capsys.readouterr().err
    assert f'note: replacing the existing file {link}' in err and str(target) in err
    assert link.is_symlink() and target.read_text().startswith('path,class')   # the link's target was written


# ------------------------------------------------------------------------------------------ spreadsheet formulas
FORMULA_NAMES = ['=1+2.jpg', '+SUM(1).jpg', '-3.jpg', '@cmd.jpg', '\tTAB.jpg', '\rCR.jpg', "'quoted.jpg",
                 '=cmd|calc!A0.jpg']


def test_predicts_csv_neutralises_cells_that_start_a_formula(weights, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(FORMULA_NAMES):
        shutil.copy(PHOTOS[i % len(PHOTOS)], folder / name)
    (folder / '=broken.jpg').write_bytes(b'not an image')
    monkeypatch.chdir(folder)   # relative paths: the path cells start with the names
    out = tmp_path / 'predictions.csv'
    assert exit_code(main, ['--weights', weights, '--csv', out, '--no-progress', '--',   # '-3.jpg' is no option
                                    *FORMULA_NAMES, '=broken.jpg']) == 1
    rows = read_rows(out)
    assert_formula_safe(rows)
    paths = [row[0] for row in rows[1:]]
    assert paths == ["'" + name for name in FORMULA_NAMES + ['=broken.jpg']]   # one leading ' to drop
    assert all(row[1] in CLASSES for row in rows[1:-1])


# ------------------------------------------------------------------------------ a reader that stops, unwritable outputs
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
        code = exit_code(main, [data, '--weights', weights, '--no-progress'])
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
    code = exit_code(main, [PHOTOS[0], '--weights', weights, '--csv', target, '--no-progress'])
    err = capsys.readouterr().err
    assert code not in (0, 1), err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error:') and str(target) in err, err


# ------------------------------------------------------------------------------------------ decoder errors of any type
@pytest.mark.parametrize('hostile_decoder', PIL_OPEN_ERRORS, indirect=True, ids=lambda e: type(e).__name__)
def test_a_decoder_error_of_any_type_is_one_error_row_of_predict(hostile_decoder, weights, tmp_path, capsys):
    folder = tmp_path / 'photos'
    folder.mkdir()
    for i, name in enumerate(['a.jpg', 'b_hostile.jpg', 'c.jpg', 'd.jpg']):
        shutil.copy(PHOTOS[i], folder / name)
    out = tmp_path / 'predictions.csv'
    code = exit_code(main, [folder, '--weights', weights, '--csv', out, '--batch-size', '3',
                                    '--no-progress'])
    captured = capsys.readouterr()
    assert code == 1
    rows = {Path(row[0]).name: row for row in read_rows(out)[1:]}
    assert list(rows) == ['a.jpg', 'b_hostile.jpg', 'c.jpg', 'd.jpg']
    assert rows['b_hostile.jpg'][1] == '' and rows['b_hostile.jpg'][-1]      # its error, and no class
    assert all(rows[n][1] in CLASSES and rows[n][-1] == '' for n in ('a.jpg', 'c.jpg', 'd.jpg'))
    assert 'b_hostile.jpg\tERROR' in captured.err and len(captured.out.splitlines()) == 3
