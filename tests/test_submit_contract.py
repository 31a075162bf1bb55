"""The delivery contract of `flowers_fastai.submit`, line by line (see the module docstring):

- `predict(model, image_path)` returns one of CLASSES for any image PIL can decode (many modes and formats,
  EXIF rotation, animated GIF, no extension, tiny and huge images, truncated JPEG with a warning), str or Path;
  FileNotFoundError for a missing path; ValueError naming the path for anything else (directory, empty,
  text, random bytes, decompression bombs, without allocating them); TypeError for a wrong model / path type.
- `load_cnn_model` / `load_vit_model`: FileNotFoundError naming the command that writes the file; ValueError
  for everything that is not a raw 5-class state_dict of that family (no code in a file ever runs); relative
  paths looked up in the cwd, then in weights/; fp16 files load as float32; every key is checked.
- `flowers_fastai.submit` works with fastai not importable.

Every image is generated with PIL under pytest's tmp dirs; the models are the tiny ones from conftest.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch import nn

from flowers_fastai import preprocess, submit
from flowers_fastai.inference import Ensemble
from flowers_fastai.preprocess import TruncatedImageWarning, open_image
from flowers_fastai.submit import CLASSES, load_cnn_model, load_vit_model, predict, predict_proba

from .conftest import REPO, real_photos


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope='module')
def cnn_model(tiny_cnn_file):
    return load_cnn_model(tiny_cnn_file)


@pytest.fixture(scope='module')
def vit_model(tiny_vit_file):
    return load_vit_model(tiny_vit_file)


def _predict_strict(model, path):
    """predict, with any TruncatedImageWarning turned into an error: intact images must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', TruncatedImageWarning)
        result = predict(model, path)
    assert isinstance(result, str)
    assert result in CLASSES
    return result


def _first_real_photo() -> Path:
    photos = [p for ps in real_photos(1).values() for p in ps]
    if not photos:
        pytest.skip('no real photo found')
    return photos[0]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny (<100 bytes) PNG whose IHDR declares width x height RGB: nothing large exists on disk."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b'\x00' * 16)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', idat)
                     + _png_chunk(b'IEND', b''))
    return path


def _between_1x_and_2x_side() -> int:
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    assert Image.MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS
    return side


# ------------------------------------------------------------------------------- generated images
def _rgb(path):
    Image.new('RGB', (48, 36), (200, 30, 40)).save(path / 'rgb.jpg')
    return path / 'rgb.jpg'


def _rgba(path):
    img = Image.new('RGBA', (40, 40), (0, 0, 0, 0))
    img.paste((250, 220, 10, 255), (10, 10, 30, 30))
    img.save(path / 'rgba.png')
    return path / 'rgba.png'


def _palette(path):
    Image.new('RGB', (40, 30), (20, 160, 40)).convert('P', palette=Image.Palette.ADAPTIVE).save(path / 'p.png')
    assert Image.open(path / 'p.png').mode == 'P'
    return path / 'p.png'


def _palette_transparency(path):
    img = Image.new('P', (40, 30), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (10, 10, 30, 20))
    img.save(path / 'pt.png', transparency=0)
    with Image.open(path / 'pt.png') as check:
        assert check.mode == 'P' and 'transparency' in check.info
    return path / 'pt.png'


def _gray(path):
    Image.new('L', (30, 40), 100).save(path / 'gray.png')
    return path / 'gray.png'


def _cmyk(path):
    Image.new('CMYK', (40, 30), (0, 200, 200, 0)).save(path / 'cmyk.jpg', 'JPEG')
    with Image.open(path / 'cmyk.jpg') as check:
        assert check.mode == 'CMYK'
    return path / 'cmyk.jpg'


def _gray16(path):
    Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16)).save(path / 'gray16.png')
    with Image.open(path / 'gray16.png') as check:
        assert check.mode.startswith('I;16')
    return path / 'gray16.png'


def _bilevel(path):
    img = Image.new('1', (40, 30), 0)
    img.paste(1, (0, 0, 20, 30))
    img.save(path / 'bilevel.png')
    assert Image.open(path / 'bilevel.png').mode == '1'
    return path / 'bilevel.png'


def _webp(path):
    Image.new('RGB', (40, 30), (90, 40, 160)).save(path / 'img.webp', 'WEBP')
    return path / 'img.webp'


def _bmp(path):
    Image.new('RGB', (40, 30), (90, 140, 160)).save(path / 'img.bmp', 'BMP')
    return path / 'img.bmp'


def _animated_gif(path):
    frames = [Image.new('RGB', (32, 32), (255, 0, 0)), Image.new('RGB', (32, 32), (0, 0, 255))]
    frames[0].save(path / 'anim.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path / 'anim.gif') as check:
        assert getattr(check, 'n_frames', 1) == 2
    return path / 'anim.gif'


def _exif_jpeg(path, orientation):
    """40x20 stored pixels: left half red, right half blue, with an EXIF orientation tag."""
    img = Image.new('RGB', (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    name = path / f'exif{orientation}.jpg'
    img.save(name, 'JPEG', exif=exif.tobytes(), quality=95)
    return name


def _no_extension(path):
    Image.new('RGB', (40, 30), (10, 100, 200)).save(path / 'photo_without_extension', 'PNG')
    return path / 'photo_without_extension'


def _tiny(path):
    Image.new('RGB', (4, 4), (255, 255, 0)).save(path / 'tiny.png')
    return path / 'tiny.png'


IMAGE_MAKERS = {
    'rgb_jpeg': _rgb, 'rgba_png': _rgba, 'palette_png': _palette, 'palette_transparency_png': _palette_transparency,
    'grayscale_L': _gray, 'cmyk_jpeg': _cmyk, 'gray16_png': _gray16, 'bilevel_1bit': _bilevel, 'webp': _webp,
    'bmp': _bmp, 'animated_gif': _animated_gif, 'exif6_jpeg': lambda p: _exif_jpeg(p, 6),
    'exif8_jpeg': lambda p: _exif_jpeg(p, 8), 'no_extension': _no_extension, 'tiny_4x4': _tiny,
}


@pytest.fixture(scope='session')
def huge_jpeg(tmp_path_factory) -> Path:
    """An 8000x6000 JPEG (low entropy, so cheap to write and small on disk), written once per session."""
    path = tmp_path_factory.mktemp('huge') / 'huge_8000x6000.jpg'
    Image.new('RGB', (8000, 6000), (40, 150, 60)).save(path, 'JPEG', quality=75)
    return path


# ------------------------------------------------------------------- predict: any decodable image
@pytest.mark.parametrize('kind', list(IMAGE_MAKERS))
def test_predict_returns_a_class_for_every_kind_of_image(kind, tmp_path, cnn_model, vit_model):
    path = IMAGE_MAKERS[kind](tmp_path)
    img = open_image(path)
    assert img.mode == 'RGB'
    _predict_strict(cnn_model, path)
    _predict_strict(vit_model, path)


def test_open_image_16bit_png_is_rescaled_not_clipped_to_white(tmp_path):
    img = open_image(_gray16(tmp_path))
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (30, 40, 3)
    assert 120 <= arr.min() and arr.max() <= 135, f'mid-gray 16-bit should give ~127, got {arr.min()}..{arr.max()}'


def test_open_image_palette_transparency_and_rgba_are_composited_on_white(tmp_path):
    arr = np.asarray(open_image(_palette_transparency(tmp_path)))
    assert tuple(arr[0, 0]) == (255, 255, 255)     # transparent index -> white, not black
    assert tuple(arr[15, 20]) == (255, 0, 0)       # opaque red stays red
    arr = np.asarray(open_image(_rgba(tmp_path)))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[20, 20]) == (250, 220, 10)


def test_open_image_animated_gif_uses_the_first_frame(tmp_path):
    arr = np.asarray(open_image(_animated_gif(tmp_path))).astype(int)
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50, f'expected frame 0 (red), got mean {(r, g, b)}'


@pytest.mark.parametrize('orientation, red_at', [(6, 'top'), (8, 'bottom')])
def test_open_image_applies_exif_orientation(orientation, red_at, tmp_path):
    path = _exif_jpeg(tmp_path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = open_image(path)
    assert img.size == (20, 40)
    arr = np.asarray(img).astype(int)
    top, bottom = arr[:15].reshape(-1, 3).mean(axis=0), arr[25:].reshape(-1, 3).mean(axis=0)
    red, blue = (top, bottom) if red_at == 'top' else (bottom, top)
    assert red[0] > 200 and red[2] < 60, (orientation, red)
    assert blue[2] > 200 and blue[0] < 60, (orientation, blue)


def test_huge_jpeg_is_draft_decoded_not_at_full_size(huge_jpeg, cnn_model, monkeypatch):
    img = open_image(huge_jpeg, draft_min_side=cnn_model.flowers_preprocessing.resize_to)
    assert img.size[0] <= 1000 and img.size[1] <= 750
    assert img.size[0] / img.size[1] == pytest.approx(8000 / 6000, rel=0.01)
    img = open_image(huge_jpeg, draft_min_side=224)
    assert img.size[0] <= 1000 and min(img.size) >= 224

    # predict goes through the same draft decoding: the image it resizes is never the full 8000x6000
    seen = []
    original = preprocess.resize_center_crop

    def spy(img, pp):
        seen.append(img.size)
        return original(img, pp)

    monkeypatch.setattr(preprocess, 'resize_center_crop', spy)
    _predict_strict(cnn_model, huge_jpeg)
    assert seen and all(w <= 1000 and h <= 1000 for w, h in seen), seen


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
    path = _rgb(tmp_path)
    assert isinstance(path, Path)
    by_path = _predict_strict(cnn_model, path)
    by_str = _predict_strict(cnn_model, str(path))
    assert by_path == by_str


def test_predict_on_real_photos(cnn_model, vit_model):
    photos = real_photos(2)
    assert sum(len(ps) for ps in photos.values()) >= 2 * len(CLASSES) - 1
    for paths in photos.values():
        for path in paths:
            _predict_strict(cnn_model, path)
            _predict_strict(vit_model, path)


# ------------------------------------------------------------------------------ predict: errors
def test_predict_missing_path_is_file_not_found(tmp_path, cnn_model):
    with pytest.raises(FileNotFoundError):
        predict(cnn_model, tmp_path / 'nope.jpg')
    with pytest.raises(FileNotFoundError):
        predict(cnn_model, str(tmp_path / 'nope.jpg'))


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


def _bomb_over_2x(p):
    return _write_png_header_only(p / 'bomb.png', 40000, 40000)


def _bomb_between_1x_and_2x(p):
    side = _between_1x_and_2x_side()
    return _write_png_header_only(p / 'bomb_warn_only.png', side, side)


BAD_INPUTS = {'directory': _directory, 'empty_file': _empty, 'text_file': _text, 'random_bytes': _random_bytes,
              'decompression_bomb': _bomb_over_2x, 'bomb_between_1x_and_2x': _bomb_between_1x_and_2x}


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


def test_decompression_bombs_do_not_blow_up_memory(tmp_path):
    """In a fresh process (so the peak RSS is meaningful), refusing both bombs must not allocate them:
    decoding the 1x-2x one as RGB would take > 400 MB."""
    big, warn_only = _bomb_over_2x(tmp_path), _bomb_between_1x_and_2x(tmp_path)
    code = textwrap.dedent('''
        import resource, sys
        from flowers_fastai.preprocess import load_for_model, cnn_preprocessing
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path in sys.argv[1:]:
            try:
                load_for_model(path, cnn_preprocessing(32))
            except ValueError:
                pass
            else:
                raise SystemExit(f'no ValueError for {path}')
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
    ''')
    out = subprocess.run([sys.executable, '-c', code, str(big), str(warn_only)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb = int(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 100, f'peak RSS grew by {grown_mb} MB while refusing decompression bombs'


def test_predict_type_errors(tmp_path, cnn_model, tiny_cnn_file):
    path = _rgb(tmp_path)
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


# ------------------------------------------------------------------------------- load_*: errors
LOADERS = {'cnn': load_cnn_model, 'vit': load_vit_model}


@pytest.fixture
def weights_files(tiny_cnn_file, tiny_vit_file):
    return {'cnn': tiny_cnn_file, 'vit': tiny_vit_file}


def _save_like(tmp_path: Path, source: Path, state_dict, name: str) -> Path:
    """Save `state_dict` as tmp_path/name, with a copy of `source`'s sidecar beside it."""
    path = tmp_path / name
    torch.save(state_dict, path)
    if source.with_suffix('.json').is_file():
        shutil.copy(source.with_suffix('.json'), path.with_suffix('.json'))
    return path


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


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_jpeg_bytes_named_pth(family, tmp_path):
    path = tmp_path / 'photo.pth'
    buf = io.BytesIO()
    Image.new('RGB', (16, 16), (1, 2, 3)).save(buf, 'JPEG')
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_truncated_torch_file(family, tmp_path, weights_files):
    data = weights_files[family].read_bytes()
    path = tmp_path / 'half.pth'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)


class _RunsCode:
    """Unpickling this calls exec(): writes a marker file. A safe loader must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({str(self.marker)!r}, "w").write("code ran")',))


@pytest.mark.parametrize('family', ['cnn', 'vit'])
@pytest.mark.parametrize('container', ['torch_zip', 'plain_pickle'])
def test_load_pickle_that_carries_code_never_runs_it(family, container, tmp_path, weights_files):
    def write(path, marker):
        payload = dict(torch.load(weights_files[family], weights_only=True))
        payload['evil'] = _RunsCode(marker)
        if container == 'torch_zip':
            torch.save(payload, path)
        else:
            with open(path, 'wb') as f:
                pickle.dump(payload, f)

    # the payload is real: an unsafe load does run it
    proof_marker = tmp_path / 'proof_marker'
    write(tmp_path / 'proof.pth', proof_marker)
    if container == 'torch_zip':
        torch.load(tmp_path / 'proof.pth', weights_only=False)
    else:
        with open(tmp_path / 'proof.pth', 'rb') as f:
            pickle.load(f)
    assert proof_marker.read_text() == 'code ran'

    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    write(path, marker)
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)
    assert not marker.exists(), 'code in the weights file was executed'


def _other_state_dicts():
    torch.manual_seed(0)
    yield 'sequential', nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict()
    import timm
    # ConvNeXt V1 atto: same stem / stage layout and widths as V2 atto, but other block keys
    yield 'convnext_v1_atto', timm.create_model('convnext_atto', pretrained=False, num_classes=5).state_dict()
    try:
        import torchvision
    except ImportError:
        return
    yield 'resnet18', torchvision.models.resnet18(weights=None, num_classes=5).state_dict()


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_state_dict_of_another_model(family, tmp_path):
    for name, state_dict in _other_state_dicts():
        path = tmp_path / f'{name}.pth'
        torch.save(state_dict, path)
        with pytest.raises(ValueError) as err:
            LOADERS[family](path)
        assert str(path) in str(err.value), name


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_non_state_dict_objects(family, tmp_path):
    for name, obj in {'list': [torch.zeros(3)], 'tensor': torch.zeros(3), 'empty_dict': {},
                      'dict_with_ints': {'a.weight': torch.zeros(2), 'epoch': 3}}.items():
        path = tmp_path / f'{name}.pth'
        torch.save(obj, path)
        with pytest.raises(ValueError) as err:
            LOADERS[family](path)
        assert str(path) in str(err.value), name


@pytest.mark.parametrize('family, head', [('cnn', 'head.fc'), ('vit', 'head')])
def test_load_head_with_other_than_5_classes(family, head, tmp_path, weights_files):
    state_dict = torch.load(weights_files[family], weights_only=True)
    in_features = state_dict[f'{head}.weight'].shape[1]
    state_dict[f'{head}.weight'] = torch.zeros(7, in_features)
    state_dict[f'{head}.bias'] = torch.zeros(7)
    path = _save_like(tmp_path, weights_files[family], state_dict, 'seven.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert '7' in str(err.value) and '5' in str(err.value)
    assert str(path) in str(err.value)


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


@pytest.fixture(scope='module')
def fastai_export_file(tmp_path_factory) -> Path:
    """A real (tiny) fastai `learn.export()` pickle."""
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    from fastai.learner import Learner
    torch.manual_seed(0)
    items = [(torch.randn(4), torch.tensor(i % 2)) for i in range(8)]
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(6)), [6, 7]])
    learn = Learner(dsets.dataloaders(bs=4, device='cpu'), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss())
    path = tmp_path_factory.mktemp('fastai_export') / 'export.pkl'
    learn.export(path)
    assert path.is_file()
    return path


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_fastai_export_pickle_points_to_export_py(family, fastai_export_file, tmp_path):
    path = tmp_path / 'learner.pth'
    shutil.copy(fastai_export_file, path)
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert 'export.py' in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_fp16_file_gives_float32_model(family, tmp_path, weights_files, vit_model, cnn_model):
    state_dict = torch.load(weights_files[family], weights_only=True)
    assert any(v.dtype == torch.float32 for v in state_dict.values())
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    path = _save_like(tmp_path, weights_files[family], half, 'half.pth')
    model = LOADERS[family](path)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, half[k].float()), k
    _predict_strict(model, _rgb(tmp_path))


@pytest.mark.parametrize('family, extra_key, missing_key', [
    ('cnn', 'stages.0.blocks.0.extra_scale', 'head.norm.weight'),
    ('cnn', 'head.fc.extra', 'stages.3.blocks.1.mlp.grn.weight'),
    ('vit', 'visual.extra_token', 'visual.ln_post.weight'),
    ('vit', 'head.extra', 'visual.transformer.resblocks.1.mlp.c_fc.bias'),
])
def test_load_checks_every_key(family, extra_key, missing_key, tmp_path, weights_files):
    state_dict = torch.load(weights_files[family], weights_only=True)
    assert missing_key in state_dict and extra_key not in state_dict

    extra = dict(state_dict, **{extra_key: torch.zeros(3)})
    path = _save_like(tmp_path, weights_files[family], extra, 'extra.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert extra_key in str(err.value)

    missing = {k: v for k, v in state_dict.items() if k != missing_key}
    path = _save_like(tmp_path, weights_files[family], missing, 'missing.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert missing_key in str(err.value)

    # the untouched state_dict itself loads: the failures above are about the one key
    LOADERS[family](_save_like(tmp_path, weights_files[family], state_dict, 'ok.pth'))


# ----------------------------------------------------------------------------- no fastai needed
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


# ------------------------------------------------------------------------------------------ overflowing weights
@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_finite_but_huge_weights_are_refused_at_load(family, tmp_path, weights_files):
    state = torch.load(weights_files[family], weights_only=True)
    huge = {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in state.items()}
    path = _save_like(tmp_path, weights_files[family], huge, f'{family}_huge.pth')
    with pytest.raises(ValueError, match='non-finite logits'):
        submit.load_any_model(path)


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
