"""Calibrated probabilities, TTA, ensembles and batches (inference.py, submit.predict_proba / load_ensemble): in a
batch, a file that fails to decode, whatever the decoder raises, is one error row and the others are classified."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from flowers_fastai.inference import Ensemble, predict_files, tta_views
from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import load_for_model, open_image, resize_center_crop
from flowers_fastai.submit import load_cnn_model, load_ensemble, load_vit_model, predict, predict_proba

from .helpers import EXAMPLES, PHOTOS, bad_files, flat_psd


def _photos():
    return sorted(EXAMPLES.glob('*.jpg'))


def _with_temperature(weights, tmp_path, temperature):
    path = tmp_path / weights.name
    shutil.copy(weights, path)
    sidecar = json.loads(weights.with_suffix('.json').read_text())
    path.with_suffix('.json').write_text(json.dumps({**sidecar, 'temperature': temperature}))
    return path


def test_predict_proba_is_the_softmax_of_the_logits_over_the_sidecar_temperature(tiny_cnn_file, tmp_path):
    photo = _photos()[0]
    plain = load_cnn_model(tiny_cnn_file)
    hot = load_cnn_model(_with_temperature(tiny_cnn_file, tmp_path, 2.5))
    assert plain.flowers_temperature == 1.0 and hot.flowers_temperature == 2.5
    with torch.inference_mode():
        logits = plain(load_for_model(photo, plain.flowers_preprocessing))[0]
    for model, t in ((plain, 1.0), (hot, 2.5)):
        p = predict_proba(model, photo)
        assert list(p) == CLASSES and sum(p.values()) == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(torch.tensor(list(p.values())), (logits / t).softmax(-1), atol=1e-6, rtol=0)
        assert predict(model, photo) == max(p, key=p.get)   # temperature never changes the class


@pytest.mark.parametrize('bad', [0, -1.0, 'hot', None, True])
def test_a_sidecar_temperature_that_is_not_a_positive_number_is_refused(tiny_cnn_file, tmp_path, bad):
    with pytest.raises(ValueError, match='temperature'):
        load_cnn_model(_with_temperature(tiny_cnn_file, tmp_path, bad))


def test_ensemble_averages_its_members_calibrated_probabilities(tiny_cnn_file, tiny_vit_file, tmp_path):
    cnn_path = _with_temperature(tiny_cnn_file, tmp_path, 0.5)
    both = load_ensemble(cnn_path, tiny_vit_file)
    assert isinstance(both, Ensemble) and isinstance(both, torch.nn.Module)
    cnn, vit = load_cnn_model(cnn_path), load_vit_model(tiny_vit_file)
    for photo in _photos()[:3]:
        expected = {c: (predict_proba(cnn, photo)[c] + predict_proba(vit, photo)[c]) / 2 for c in CLASSES}
        got = predict_proba(both, photo)
        assert got == pytest.approx(expected, abs=1e-6)
        assert predict(both, photo) == max(expected, key=expected.get)


def test_tta_views_are_the_inference_crop_two_end_crops_and_their_mirrors(tiny_cnn_file):
    pp = load_cnn_model(tiny_cnn_file).flowers_preprocessing
    img = open_image(_photos()[0])
    views = tta_views(img, pp)
    assert len(views) == 6 and all(v.size == (pp.size, pp.size) for v in views)
    assert views[0].tobytes() == resize_center_crop(img, pp).tobytes()
    assert views[3].tobytes() == views[0].transpose(0).tobytes()            # mirrored center
    assert len({v.tobytes() for v in views}) == 6                            # a landscape photo: all differ


def test_batches_give_each_files_own_probabilities_and_a_bad_file_is_a_row_not_a_crash(tiny_cnn_file, tmp_path):
    model = load_cnn_model(tiny_cnn_file)
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    paths = [*_photos()[:3], broken, tmp_path / 'missing.jpg', *_photos()[3:]]
    results = list(predict_files(model, paths, batch_size=2))
    assert [r.path for r in results] == paths                                 # in order, one per file
    assert [r.error is not None for r in results] == [False] * 3 + [True, True] + [False] * 2
    assert 'ValueError' in results[3].error and 'FileNotFoundError' in results[4].error
    for r in results:
        if r.error is None:
            assert r.probabilities == pytest.approx(predict_proba(model, r.path), abs=1e-5)
            assert r.label == predict(model, r.path)


def test_predict_files_gives_one_error_row_per_bad_file_and_classifies_the_rest(tmp_path, cnn_model,
                                                                               hostile_format):
    bad = bad_files(tmp_path / 'bad')
    crafted = hostile_format(tmp_path / 'crafted.png', NotImplementedError('Unimplemented pixel format'))
    flat = flat_psd(tmp_path / 'flat.psd')
    paths = [PHOTOS[0], bad['dds_named_jpg'], PHOTOS[1], bad['path_of_5000_chars'], crafted, flat, PHOTOS[2],
             bad['dds_unknown_fourcc'], PHOTOS[3]]
    for tta in (False, True):
        rows = list(predict_files(cnn_model, paths, batch_size=2, tta=tta))
        assert [row.path for row in rows] == paths
        failed = {row.path for row in rows if row.error}
        assert failed == {bad['dds_named_jpg'], bad['path_of_5000_chars'], crafted, bad['dds_unknown_fourcc']}
        for row in rows:
            if row.error:
                assert row.error.startswith('ValueError: ') and str(row.path) in row.error
            else:
                assert row.label in CLASSES
