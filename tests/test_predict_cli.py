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


def test_ensemble_without_a_vit_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match='vit_flowers.pth'):
        main([str(EXAMPLES), '--model', 'ensemble'])


def test_int8_runs_the_vit_in_int8_and_is_refused_for_the_cnn(tiny_cnn_file, tiny_vit_file, tmp_path, capsys):
    from flowers_fastai.predict import load_chosen_model
    from flowers_fastai.inference_nets import Int8Linear
    out = tmp_path / 'int8.csv'
    assert main([str(EXAMPLES), '--model', 'vit', '--weights', str(tiny_vit_file), '--int8', '--csv', str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == len(list(EXAMPLES.glob('*.jpg')))
    ensemble = load_chosen_model('ensemble', str(tiny_cnn_file), str(tiny_vit_file), int8=True)
    assert isinstance(ensemble.members[1].visual.transformer.resblocks[0].attn.packed[0], Int8Linear)
    with pytest.raises(SystemExit, match='ViT only'):
        main([str(EXAMPLES), '--weights', str(tiny_cnn_file), '--int8'])
