"""`python -m flowers_fastai.predict`: batches over files and folders, a CSV row per file, bad files as rows."""
from __future__ import annotations

import csv
import shutil

import pytest

from flowers_fastai.labels import CLASSES
from flowers_fastai.predict import main
from flowers_fastai.submit import load_cnn_model, predict_proba

from .conftest import EXAMPLES


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
