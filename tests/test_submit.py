"""The delivery API of `flowers_fastai.submit` (see its module docstring), as a grader's script meets it:

- `predict(model, image_path)` returns one of CLASSES for any image PIL can decode (every mode and format, str or
  Path, a truncated JPEG with a warning); FileNotFoundError for a missing path; ValueError naming the path for
  anything else (a directory, an empty or text file, random bytes, a decompression bomb); TypeError for a wrong
  model or path type. How a photo is decoded is test_preprocess.py's.
- `load_cnn_model` / `load_vit_model`: FileNotFoundError naming the command that writes the file; relative paths
  looked up in the cwd, then in weights/; a file of the other family names the loader to use. What a weights file
  or its sidecar may hold is test_weights_files.py's.
- A grader's loop: the same answers whatever the caller's autograd mode, autocast or default dtype, from threads
  sharing one model and from process pools of every start method; a loaded model owns its weights (its file may
  change or shrink afterwards); no NaN reaches the argmax.
- `flowers_fastai.submit` works with fastai not importable.

The models are conftest's tiny random ones; the images are generated under pytest's tmp dirs, or the repo's
examples/.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from torch import nn

from flowers_fastai import submit
from flowers_fastai.inference import Ensemble
from flowers_fastai.preprocess import TruncatedImageWarning, open_image
from flowers_fastai.submit import (CLASSES, load_any_model, load_cnn_model, load_ensemble, load_vit_model, predict,
                                   predict_proba, quantize_int8)

from .helpers import (IMAGE_MAKERS, LOADERS, PHOTOS, REPO, bomb_between_1x_and_2x, bomb_over_2x, photo_answers,
                      predict_strict, real_photos, rgb_jpeg)


def _first_real_photo() -> Path:
    photos = [p for ps in real_photos(1).values() for p in ps]
    if not photos:
        pytest.skip('no real photo found')
    return photos[0]


# ----------------------------------------------------------------------------------------- predict: any decodable image
@pytest.mark.parametrize('kind', list(IMAGE_MAKERS))
def test_predict_returns_a_class_for_every_kind_of_image(kind, tmp_path, cnn_model, vit_model):
    path = IMAGE_MAKERS[kind](tmp_path)
    img = open_image(path)
    assert img.mode == 'RGB'
    predict_strict(cnn_model, path)
    predict_strict(vit_model, path)


def test_truncated_jpeg_gives_a_class_and_a_warning(tmp_path, cnn_model, vit_model):
    data = _first_real_photo().read_bytes()
    path = tmp_path / 'truncated.jpg'
    path.write_bytes(data[:len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for model in (cnn_model, vit_model):
        with pytest.warns(TruncatedImageWarning):
            assert predict(model, path) in CLASSES
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the process-wide flag is restored


def test_predict_accepts_str_and_pathlib_path(tmp_path, cnn_model):
    path = rgb_jpeg(tmp_path)
    assert isinstance(path, Path)
    by_path = predict_strict(cnn_model, path)
    by_str = predict_strict(cnn_model, str(path))
    assert by_path == by_str


def test_predict_on_real_photos(cnn_model, vit_model):
    photos = real_photos(2)
    assert sum(len(ps) for ps in photos.values()) >= 2 * len(CLASSES) - 1
    for paths in photos.values():
        for path in paths:
            predict_strict(cnn_model, path)
            predict_strict(vit_model, path)


# ------------------------------------------------------------------------------------------ predict: errors
def test_predict_missing_path_is_file_not_found(tmp_path, cnn_model):
    with pytest.raises(FileNotFoundError):
        predict(cnn_model, tmp_path / 'nope.jpg')
    with pytest.raises(FileNotFoundError):
        predict(cnn_model, str(tmp_path / 'nope.jpg'))


def test_a_missing_path_stays_file_not_found(tmp_path, cnn_model):
    for path in (tmp_path / 'nope.jpg', tmp_path / 'nope' / 'deeper.jpg', tmp_path / ('a/' * 1000 + 'b.jpg')):
        with pytest.raises(FileNotFoundError):
            predict(cnn_model, path)


def _directory(p):
    (p / 'a_folder.jpg').mkdir()
    return p / 'a_folder.jpg'


def _empty(p):
    (p / 'empty.jpg').write_bytes(b'')
    return p / 'empty.jpg'


def _text(p):
    (p / 'notes.jpg').write_text('these are not the pixels you are looking for\n' * 20)
    return p / 'notes.jpg'


def _random_bytes(p):
    (p / 'noise.png').write_bytes(random.Random(0).randbytes(4096))
    return p / 'noise.png'


BAD_INPUTS = {'directory': _directory, 'empty_file': _empty, 'text_file': _text, 'random_bytes': _random_bytes,
              'decompression_bomb': bomb_over_2x, 'bomb_between_1x_and_2x': bomb_between_1x_and_2x}


@pytest.mark.parametrize('kind', list(BAD_INPUTS))
def test_predict_value_error_names_the_path(kind, tmp_path, cnn_model):
    path = BAD_INPUTS[kind](tmp_path)
    assert path.stat().st_size < 10_000 or path.is_dir()
    with pytest.raises(ValueError) as err:
        predict(cnn_model, path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError) as err:
        predict(cnn_model, str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError) as err:
        open_image(path)
    assert str(path) in str(err.value)


def test_predict_type_errors(tmp_path, cnn_model, tiny_cnn_file):
    path = rgb_jpeg(tmp_path)
    from flowers_fastai.architectures import build_cnn
    raw = build_cnn('convnextv2_atto').eval()          # the right network, but not from load_cnn_model
    raw.load_state_dict(torch.load(tiny_cnn_file, weights_only=True))
    for model in (raw, nn.Linear(3, 5), None, 'cnn_flowers.pth'):
        with pytest.raises(TypeError, match=r'returned by load_cnn_model\(\), load_vit_model\(\) or load_ensemble'):
            predict(model, path)
        with pytest.raises(TypeError, match='returned by load_cnn_model'):
            predict_proba(model, path)
    for bad_path in (42, None, b'x', [str(path)]):
        with pytest.raises(TypeError):
            predict(cnn_model, bad_path)


# -------------------------------------------------------------------------------------- load_*: where the file is found
@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_missing_file_names_the_command(family, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        LOADERS[family](tmp_path / 'missing.pth')
    assert 'export.py' in str(err.value)
    assert 'train.py' in str(err.value)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_relative_path_missing_lists_cwd_and_weights_dir(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = 'definitely_not_here_4f2a.pth'
    with pytest.raises(FileNotFoundError) as err:
        LOADERS[family](name)
    message = str(err.value)
    assert str(tmp_path / name) in message
    assert str(REPO / 'weights' / name) in message
    assert 'export.py' in message


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_default_path_is_looked_up_in_cwd_first(family, tmp_path, monkeypatch, weights_files):
    source = weights_files[family]
    shutil.copy(source, tmp_path / source.name)
    shutil.copy(source.with_suffix('.json'), tmp_path / source.with_suffix('.json').name)
    assert source.name == {'cnn': 'cnn_flowers.pth', 'vit': 'vit_flowers.pth'}[family]  # the default names
    # weights/ must not be consulted when the cwd has the file: point it at a folder holding a broken file
    decoy = tmp_path / 'decoy_weights'
    decoy.mkdir()
    (decoy / source.name).write_bytes(b'not a torch file')
    monkeypatch.setattr(submit, 'WEIGHTS_DIR', decoy)
    monkeypatch.chdir(tmp_path)
    model = LOADERS[family]()
    expected = torch.load(source, weights_only=True)
    got = model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_relative_path_falls_back_to_weights_dir(family, tmp_path, monkeypatch, weights_files):
    source = weights_files[family]
    weights_dir, elsewhere = tmp_path / 'weights', tmp_path / 'elsewhere'
    weights_dir.mkdir()
    elsewhere.mkdir()
    shutil.copy(source, weights_dir / source.name)
    shutil.copy(source.with_suffix('.json'), weights_dir / source.with_suffix('.json').name)
    monkeypatch.setattr(submit, 'WEIGHTS_DIR', weights_dir)
    monkeypatch.chdir(elsewhere)
    model = LOADERS[family](source.name)
    assert model.flowers_family == family
    expected = torch.load(source, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_weights_dir_is_the_repos_weights_folder():
    assert submit.WEIGHTS_DIR == REPO / 'weights'


def test_load_cnn_file_with_vit_loader_says_which_family(tiny_cnn_file):
    with pytest.raises(ValueError) as err:
        load_vit_model(tiny_cnn_file)
    message = str(err.value)
    assert 'load_cnn_model' in message
    assert 'CNN' in message or 'ConvNeXt' in message


def test_load_vit_file_with_cnn_loader_says_which_family(tiny_vit_file):
    with pytest.raises(ValueError) as err:
        load_cnn_model(tiny_vit_file)
    message = str(err.value)
    assert 'load_vit_model' in message
    assert 'ViT' in message or 'CLIP' in message


# ------------------------------------------------------------------------------------------ no fastai needed
def test_submit_works_with_fastai_blocked(tiny_cnn_file, tmp_path):
    photo = _first_real_photo()
    code = textwrap.dedent('''
        import importlib.abc, socket, sys

        class BlockFastai(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == 'fastai' or name.startswith('fastai.'):
                    raise ImportError(f'fastai is blocked in this test ({name})')
                return None

        sys.meta_path.insert(0, BlockFastai())
        def refuse(*a, **k):
            raise OSError('network blocked')
        socket.socket.connect = refuse
        socket.create_connection = refuse

        from flowers_fastai.submit import CLASSES, load_cnn_model, predict
        model = load_cnn_model(sys.argv[1])
        label = predict(model, sys.argv[2])
        assert label in CLASSES, label
        leaked = sorted(m for m in sys.modules if m == 'fastai' or m.startswith('fastai.'))
        assert not leaked, leaked
        print('OK', label)
    ''')
    out = subprocess.run([sys.executable, '-c', code, str(tiny_cnn_file), str(photo)], capture_output=True,
                         text=True, timeout=180, cwd=tmp_path, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].split()[0] == 'OK'
    assert out.stdout.strip().split()[-1] in CLASSES


# ------------------------------------------------------------------------------------------ autograd modes and threads
MODES = {'inference_mode': torch.inference_mode, 'no_grad': torch.no_grad, 'enable_grad': torch.enable_grad,
         'plain': nullcontext}


def _loaders(weights_files):
    """name -> a function that loads a fresh model of that kind."""
    return {'cnn': lambda: load_cnn_model(weights_files['cnn']),
            'vit': lambda: load_vit_model(weights_files['vit']),
            'ensemble': lambda: load_ensemble(weights_files['cnn'], weights_files['vit']),
            'vit_int8': lambda: quantize_int8(load_vit_model(weights_files['vit'])),
            'any': lambda: load_any_model(weights_files['cnn'])}


@pytest.mark.parametrize('kind', ['cnn', 'vit', 'ensemble', 'vit_int8', 'any'])
@pytest.mark.parametrize('mode', ['inference_mode', 'no_grad', 'enable_grad'])
def test_load_and_predict_give_the_same_answers_in_every_autograd_mode(kind, mode, weights_files):
    load = _loaders(weights_files)[kind]
    expected = photo_answers(load())
    with MODES[mode]():                       # loaded and predicting inside the mode
        model = load()
        assert photo_answers(model) == expected
    assert photo_answers(model) == expected        # loaded inside, predicting outside
    outside = load()
    with MODES[mode]():                       # loaded outside, predicting inside
        assert photo_answers(outside) == expected
    # whatever the caller's mode at load, the model's tensors are normal ones (inference tensors have no version
    # counter and cannot be used with autograd on)
    assert not any(p.is_inference() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_a_model_loaded_under_inference_mode_runs_on_tensors_in_every_mode(weights_files):
    """Called directly on a tensor (not through predict): the same logits on the oneDNN path (no_grad,
    inference_mode) and on the autograd one."""
    with torch.inference_mode():
        cnn = load_cnn_model(weights_files['cnn'])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = cnn(x)
    for mode in ('inference_mode', 'enable_grad', 'plain'):
        with MODES[mode]():
            torch.testing.assert_close(cnn(x).detach(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('kind', ['cnn', 'vit', 'ensemble'])
def test_load_and_predict_ignore_the_callers_autocast_and_default_dtype(kind, weights_files):
    """Other global state a grader's script may have set: `torch.autocast('cpu')` (bfloat16 layers) around the
    loop, `torch.set_default_dtype(torch.float64)` before loading."""
    load = _loaders(weights_files)[kind]
    expected = photo_answers(load())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert photo_answers(load()) == expected
    torch.set_default_dtype(torch.float64)
    try:
        model = load()
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert photo_answers(model) == expected


@pytest.mark.parametrize('kind', ['cnn', 'vit', 'ensemble', 'vit_int8'])
def test_threads_sharing_one_model_get_identical_answers(kind, weights_files):
    """4 threads, each in its own autograd mode, predict on one freshly loaded model at once (its lazily packed
    caches are filled concurrently); CNN threads also call it on inputs of several sizes (a packed convolution
    weight per input shape)."""
    load = _loaders(weights_files)[kind]
    expected = photo_answers(load())
    sizes = [32, 40, 48, 56, 64, 72, 80, 88, 96, 104]   # more shapes than PackedConv remembers (8)
    reference = load()
    if kind == 'cnn':
        torch.manual_seed(0)
        inputs = [torch.randn(1, 3, s, s) for s in sizes]
        with torch.inference_mode():
            expected_logits = [reference(x) for x in inputs]
    model = load()
    barrier, results, errors = threading.Barrier(4), {}, []

    def work(i: int):
        try:
            barrier.wait()
            with list(MODES.values())[i]():
                got = [photo_answers(model) for _ in range(3)]
                logits = []
                if kind == 'cnn':
                    with torch.no_grad():
                        logits = [model(x) for x in (inputs[i:] + inputs[:i])]
                        logits = logits[len(inputs) - i:] + logits[:len(inputs) - i]
            results[i] = got, logits
        except BaseException as err:   # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for i in range(4):
        got, logits = results[i]
        assert all(answers == expected for answers in got), f'thread {i}'
        for out, exp in zip(logits, expected_logits if kind == 'cnn' else []):
            assert torch.equal(out, exp), f'thread {i}'


# ------------------------------------------------------------------------------------------ process pools
_POOL_MODEL = None


def _set_pool_model(model):
    global _POOL_MODEL
    _POOL_MODEL = model


def _predict_in_worker(path):
    return predict(_POOL_MODEL, path), torch.get_num_threads()


@pytest.mark.parametrize('start_method', ['fork', 'spawn', 'forkserver'])
def test_a_process_pool_predicts_after_load_with_every_start_method(start_method, cnn_model, tmp_path):
    """A loaded model given to a process pool's workers: fork copies it (PyTorch's OpenMP pool does not survive a
    fork: the workers hung for ever), spawn and forkserver pickle it (its packed caches held a lock). Timed out,
    so that a hang fails the test instead of holding the suite."""
    import multiprocessing
    photos = [str(_solid_photo(tmp_path / f'{i}.png', (40 * i, 120, 200))) for i in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # the parent's OpenMP pool in use with 2 threads: what made forked children hang
    try:
        expected = [predict(cnn_model, p) for p in photos]
        pool = multiprocessing.get_context(start_method).Pool(2, initializer=_set_pool_model, initargs=(cnn_model,))
        try:
            answers = pool.map_async(_predict_in_worker, photos).get(timeout=120)
        except multiprocessing.TimeoutError:
            pytest.fail(f'a {start_method} pool gave no answer in 120 s')
        finally:
            pool.terminate()
            pool.join()
    finally:
        torch.set_num_threads(threads)
    assert [label for label, _ in answers] == expected
    if start_method == 'fork':
        assert {n for _, n in answers} == {1}   # one intra-op thread in a forked worker


def _solid_photo(path: Path, rgb) -> Path:
    Image.new('RGB', (48, 40), rgb).save(path)
    return path


def test_a_loaded_model_pickles_and_predicts_the_same(cnn_model, tiny_vit_file, tmp_path):
    photo = _solid_photo(tmp_path / 'p.png', (200, 30, 60))
    for model in (cnn_model, submit.quantize_int8(load_vit_model(tiny_vit_file))):
        copy = pickle.loads(pickle.dumps(model))
        assert predict_proba(copy, photo) == pytest.approx(predict_proba(model, photo), abs=1e-6)


# --------------------------------------------------------------------------------------- the file changes after loading
def _copy(source: Path, folder: Path, name: str | None = None) -> Path:
    path = folder / (name or source.name)
    shutil.copy(source, path)
    if source.with_suffix('.json').is_file():
        shutil.copy(source.with_suffix('.json'), path.with_suffix('.json'))
    return path


def _other_weights(path: Path, fill: float | None = None) -> dict[str, torch.Tensor]:
    """The same keys and shapes as `path` holds, other values (`fill`, e.g. NaN, or random)."""
    torch.manual_seed(123)
    state = torch.load(path, weights_only=True)
    return {k: torch.full_like(v, fill) if fill is not None else torch.randn_like(v) * 0.1 for k, v in state.items()}


@pytest.mark.parametrize('family', ['cnn', 'vit'])
@pytest.mark.parametrize('change', ['torch_save_other_weights', 'torch_save_nan', 'bytes_rewritten_in_place'])
def test_a_loaded_model_does_not_change_when_its_file_does(family, change, weights_files, tmp_path):
    path = _copy(weights_files[family], tmp_path)
    model = (load_cnn_model if family == 'cnn' else load_vit_model)(path)
    expected = photo_answers(model)
    if change == 'torch_save_other_weights':
        torch.save(_other_weights(path), path)
    elif change == 'torch_save_nan':
        torch.save(_other_weights(path, float('nan')), path)
    else:   # the same size, every byte after the zip header replaced: what a careless copy in progress looks like
        size = path.stat().st_size
        with open(path, 'r+b') as f:
            f.seek(64)
            f.write(os.urandom(size - 64))
    assert photo_answers(model) == expected


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_truncating_the_file_after_loading_does_not_kill_the_process(family, weights_files, tmp_path):
    """Memory-mapped weights die of SIGBUS when their file shrinks: run it in a child process."""
    path = _copy(weights_files[family], tmp_path)
    code = textwrap.dedent('''
        import json, os, sys
        from flowers_fastai.submit import load_cnn_model, load_vit_model, predict_proba
        path, photo = sys.argv[2], sys.argv[3]
        model = (load_cnn_model if sys.argv[1] == 'cnn' else load_vit_model)(path)
        before = predict_proba(model, photo)
        os.truncate(path, 0)
        print(json.dumps([before, predict_proba(model, photo)]))
    ''')
    out = subprocess.run([sys.executable, '-c', code, family, str(path), str(PHOTOS[0])], capture_output=True,
                         text=True, timeout=300, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert out.returncode == 0, f'returncode {out.returncode}: {out.stderr[-2000:]}'
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after == before


# ---------------------------------------------------------------------------------- weights that overflow after loading
def test_a_nan_never_reaches_the_argmax(tiny_cnn_file, tmp_path):
    """Weights changed after load so that a photo overflows: predict and predict_proba refuse, never 'daisy'."""
    model = load_cnn_model(tiny_cnn_file)
    photo = _solid_photo(tmp_path / 'p.png', (200, 30, 60))
    with torch.no_grad():
        model.head.fc.weight.fill_(3e38)
    for call in (predict, predict_proba):
        with pytest.raises(ValueError, match='non-finite'):
            call(model, photo)
    with pytest.raises(ValueError, match='non-finite'):
        predict(Ensemble([model]), photo)
