"""Decoding and preprocessing a photo (flowers_fastai/preprocess.py), which `predict`, the batch CLI, evaluation,
training's data scan and the demo share:

- the inference preprocessing computes what the plain recipe computes: resize the shorter side then center-crop,
  ImageNet / CLIP normalisation;
- every mode and format becomes the RGB picture a viewer shows (16-bit rescaled, transparency on white, a GIF's first
  frame, the EXIF orientation applied);
- memory stays bounded: a huge JPEG is draft-decoded, decompression bombs are refused without being allocated,
  extreme shapes (a 277-byte 1 x 100000 PNG) and large images stay within the bound of docs/api.md, measured in
  fresh processes under an address-space cap;
- a decoder error of any type (an unknown DDS pixel format, a path too long to open, whatever a plugin raises) is
  the documented ValueError naming the path, and the next photo goes on;
- a file that ends early is still used, with a TruncatedImageWarning; a header without pixel data is a ValueError;
- decoding changes no process-wide state: threads decoding truncated photos and bombs at once refuse every bomb,
  warn once per truncated photo, and leave `ImageFile.LOAD_TRUNCATED_IMAGES` and the warning filters alone.
"""
from __future__ import annotations

import json
import os
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

from flowers_fastai import preprocess
from flowers_fastai.inference import tta_views
from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import (TruncatedImageWarning, cnn_preprocessing, open_image, resize_center_crop,
                                       to_normalized_tensor, vit_preprocessing)
from flowers_fastai.submit import load_cnn_model, predict

from .helpers import (EXAMPLES, PHOTOS, REPO, animated_gif, bad_files, bomb_between_1x_and_2x, bomb_over_2x,
                      check_outcomes, decode_concurrently, exif_jpeg, flat_psd, gray16_png, noisy_jpeg,
                      palette_transparency_png, png_chunk, predict_strict, rgba_png, truncated_copy)


PREPROCESSINGS = [cnn_preprocessing(224), vit_preprocessing(224), cnn_preprocessing(128)]


def _resize_then_crop(img: Image.Image, pp) -> Image.Image:
    """The textbook recipe: the whole photo resized (shorter side to `resize_to`), then its central square."""
    scale = pp.resize_to / min(img.size)
    resized = img.resize(tuple(max(pp.size, round(side * scale)) for side in img.size), Image.BICUBIC)
    left, top = ((side - pp.size) // 2 for side in resized.size)
    return resized.crop((left, top, left + pp.size, top + pp.size))


def _photos_of_every_shape() -> list[Image.Image]:
    photos = [open_image(path) for path in sorted(EXAMPLES.glob('*.jpg'))]
    landscape = photos[2]   # 485 x 320
    return photos + [landscape.resize(size, Image.BICUBIC) for size in
                     [(900, 300), (300, 900), (257, 257), (100, 70), (64, 200)]]   # wide, tall, square, upscaled


@pytest.mark.parametrize('pp', PREPROCESSINGS, ids=lambda pp: f'{pp.size}px_crop{pp.crop_pct}')
def test_center_crop_is_resize_then_crop_bit_for_bit(pp):
    # a resize over the crop's box alone would be faster, and differs by up to 20 levels (PIL's pass order)
    for img in _photos_of_every_shape():
        ours = resize_center_crop(img, pp)
        assert ours.size == (pp.size, pp.size) and ours.mode == 'RGB'
        assert ours.tobytes() == _resize_then_crop(img, pp).tobytes(), img.size


@pytest.mark.parametrize('pp', PREPROCESSINGS, ids=lambda pp: f'{pp.size}px_crop{pp.crop_pct}')
def test_normalised_tensor_is_the_plain_formula_bit_for_bit_in_channels_last_memory(pp):
    img = resize_center_crop(open_image(sorted(EXAMPLES.glob('*.jpg'))[0]), pp)
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()          # 3 x H x W
    expected = (pixels / 255.0 - torch.tensor(pp.mean).view(3, 1, 1)) / torch.tensor(pp.std).view(3, 1, 1)
    x = to_normalized_tensor(img, pp)
    assert x.shape == (1, 3, pp.size, pp.size) and x.dtype == torch.float32
    assert torch.equal(x[0], expected)
    assert x.is_contiguous(memory_format=torch.channels_last)   # what the CNN wants: no copy at its input


# ------------------------------------------------------------------------------------------ every mode and format
def test_open_image_16bit_png_is_rescaled_not_clipped_to_white(tmp_path):
    img = open_image(gray16_png(tmp_path))
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (30, 40, 3)
    assert 120 <= arr.min() and arr.max() <= 135, f'mid-gray 16-bit should give ~127, got {arr.min()}..{arr.max()}'


def test_open_image_palette_transparency_and_rgba_are_composited_on_white(tmp_path):
    arr = np.asarray(open_image(palette_transparency_png(tmp_path)))
    assert tuple(arr[0, 0]) == (255, 255, 255)     # transparent index -> white, not black
    assert tuple(arr[15, 20]) == (255, 0, 0)       # opaque red stays red
    arr = np.asarray(open_image(rgba_png(tmp_path)))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[20, 20]) == (250, 220, 10)


def test_open_image_animated_gif_uses_the_first_frame(tmp_path):
    arr = np.asarray(open_image(animated_gif(tmp_path))).astype(int)
    r, g, b = arr.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50, f'expected frame 0 (red), got mean {(r, g, b)}'


@pytest.mark.parametrize('orientation, red_at', [(6, 'top'), (8, 'bottom')])
def test_open_image_applies_exif_orientation(orientation, red_at, tmp_path):
    path = exif_jpeg(tmp_path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = open_image(path)
    assert img.size == (20, 40)
    arr = np.asarray(img).astype(int)
    top, bottom = arr[:15].reshape(-1, 3).mean(axis=0), arr[25:].reshape(-1, 3).mean(axis=0)
    red, blue = (top, bottom) if red_at == 'top' else (bottom, top)
    assert red[0] > 200 and red[2] < 60, (orientation, red)
    assert blue[2] > 200 and blue[0] < 60, (orientation, blue)


# -------------------------------------------------------------------------- memory: large images, bombs, extreme shapes
@pytest.fixture(scope='session')
def huge_jpeg(tmp_path_factory) -> Path:
    """An 8000x6000 JPEG (low entropy, so cheap to write and small on disk), written once per session."""
    path = tmp_path_factory.mktemp('huge') / 'huge_8000x6000.jpg'
    Image.new('RGB', (8000, 6000), (40, 150, 60)).save(path, 'JPEG', quality=75)
    return path


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
    predict_strict(cnn_model, huge_jpeg)
    assert seen and all(w <= 1000 and h <= 1000 for w, h in seen), seen


def test_decompression_bombs_do_not_blow_up_memory(tmp_path):
    """In a fresh process (so the peak RSS is meaningful), refusing both bombs must not allocate them:
    decoding the 1x-2x one as RGB would take > 400 MB."""
    big, warn_only = bomb_over_2x(tmp_path), bomb_between_1x_and_2x(tmp_path)
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


def _gray_png(path: Path, width: int, height: int) -> Path:
    """A complete 8-bit grayscale PNG of zeros: a 1 x 100000 one is 277 bytes."""
    rows = (b'\x00' + b'\x00' * width) * height
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
                     + png_chunk(b'IDAT', zlib.compress(rows, 9)) + png_chunk(b'IEND', b''))
    return path


_MEASURE = textwrap.dedent('''
    import json, resource, sys, warnings
    warnings.simplefilter('ignore')
    from PIL import Image
    from flowers_fastai.inference import predict_files, tta_views
    from flowers_fastai.preprocess import cnn_preprocessing, load_for_model, open_image
    from flowers_fastai.submit import load_cnn_model, predict

    def status_mb(field):
        return int([line for line in open('/proc/self/status') if line.startswith(field)][0].split()[1]) / 1024

    def reset_peak():   # VmHWM := VmRSS (Linux >= 4.0), so that each case's own peak shows
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return status_mb('VmRSS')

    weights, cap_mb, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    model = load_cnn_model(weights)
    pp = cnn_preprocessing(224)
    photo = sys.argv[4]
    predict(model, photo), list(predict_files(model, [photo], tta=True)), tta_views(open_image(photo), pp)  # warm up
    vm = int([line for line in open('/proc/self/status') if line.startswith('VmSize')][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + cap_mb * 2**20, vm + cap_mb * 2**20))  # a modest cap

    def run(how, path):
        if how == 'predict':
            return predict(model, path)
        if how == 'load_for_model':
            return tuple(load_for_model(path, pp).shape)
        if how == 'predict_files_tta':
            (row,) = predict_files(model, [path], tta=True)
            if row.error:
                raise ValueError(row.error)
            return row.label
        if how == 'predict_files_batch':   # one batch of 4: only each photo's crops are kept, not its decode
            rows = list(predict_files(model, [path] * 4, batch_size=4))
            if any(row.error for row in rows):
                raise ValueError(rows[0].error)
            return rows[0].label
        if how == 'tta_views':   # training's EvalResizeCrop and TTA share this resize
            return len(tta_views(open_image(path), pp))
        if how == 'tta_views_in_memory':   # an image that never went through open_image
            return len(tta_views(Image.new('RGB', tuple(json.loads(path))), pp))
        raise AssertionError(how)

    for how, path in cases:
        before = reset_peak()
        try:
            outcome = ['ok', str(run(how, path))]
        except BaseException as err:
            outcome = [type(err).__name__, str(err)[:300]]
        print(json.dumps([how, path, *outcome, status_mb('VmHWM') - before]), flush=True)
''')


def _measure(tiny_cnn_file, cases, cap_mb=1024) -> list[list]:
    """Run `cases` ([how, path]) in a fresh process under an address-space cap of `cap_mb` over its size after
    warm-up; each: [how, path, outcome ('ok' or the exception type), detail, its peak RSS over the RSS before
    it, in MB]. FLOWERS_KEEP_MALLOC=1: glibc returns freed memory, so an earlier case's cannot hide a peak."""
    if not os.access('/proc/self/clear_refs', os.W_OK):
        pytest.skip('needs Linux /proc/self/clear_refs to measure each case\'s peak memory')
    out = subprocess.run([sys.executable, '-c', _MEASURE, str(tiny_cnn_file), str(cap_mb), json.dumps(cases),
                          str(PHOTOS[0])], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, 'FLOWERS_KEEP_MALLOC': '1'})
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('[')]


EXTREME_SHAPES = [(1, 100000), (100000, 1), (3, 60000), (60000, 3), (2, 101), (7, 5000)]


def test_extreme_shapes_get_a_class_or_the_value_error_with_little_memory(tiny_cnn_file, tmp_path):
    """Through every path that resizes (predict, TTA in the batch CLI, the shared resize of TTA and training's
    validation crop, and an in-memory image that skipped open_image): a class, or a ValueError naming the path,
    and the peak RSS grows by a few MB at most, under a cap (resizing such a shape unchecked is a MemoryError under
    the cap, gigabytes without it)."""
    cases = []
    for w, h in EXTREME_SHAPES + [(2, 100), (1, 50)]:
        path = _gray_png(tmp_path / f'shape_{w}x{h}.png', w, h)
        assert path.stat().st_size < 1000
        cases += [[how, str(path)] for how in ('predict', 'load_for_model', 'predict_files_tta', 'tta_views')]
        cases.append(['tta_views_in_memory', json.dumps([w, h])])
    results = _measure(tiny_cnn_file, cases)
    assert len(results) == len(cases)
    for how, path, outcome, detail, grown_mb in results:
        assert outcome in ('ok', 'ValueError'), (how, path, outcome, detail)
        if outcome == 'ValueError' and how != 'tta_views_in_memory':
            assert path in detail, (how, path, detail)
        assert grown_mb < 64, (how, path, f'peak RSS grew by {grown_mb:.0f} MB')
    outcome_of = {(how, path): outcome for how, path, outcome, *_ in results}
    for w, h in EXTREME_SHAPES:   # refused: over 50:1
        assert outcome_of['predict', str(tmp_path / f'shape_{w}x{h}.png')] == 'ValueError'
    for w, h in [(2, 100), (1, 50)]:   # 50:1 at most: a class
        assert outcome_of['predict', str(tmp_path / f'shape_{w}x{h}.png')] == 'ok'


def _large(tmp_path: Path, kind: str, side: int = 3000) -> Path:
    ramp = Image.linear_gradient('L').resize((side, side), Image.BILINEAR)
    if kind == 'rgba':
        img = Image.merge('RGBA', [ramp, ramp.transpose(Image.ROTATE_90), ramp, ramp.transpose(Image.ROTATE_180)])
    elif kind == 'gray16':
        img = Image.fromarray(np.asarray(ramp, dtype=np.uint16) * 257)
    elif kind == 'palette_transparency':
        img = ramp.convert('P')
    else:
        img = Image.merge('RGB', [ramp] * 3)
    path = tmp_path / f'large_{kind}.png'
    img.save(path, compress_level=1, **({'transparency': 3} if kind == 'palette_transparency' else {}))
    return path


@pytest.mark.parametrize('kind', ['rgba', 'gray16', 'palette_transparency', 'rgb'])
def test_a_large_image_takes_at_most_the_documented_bytes_per_pixel(kind, tiny_cnn_file, tmp_path):
    """docs/api.md: decoding and preprocessing a PNG takes at most ~9 bytes per pixel (the decoded image and its RGB
    copy; conversions run in stripes, since whole-image conversions take ~23 bytes per pixel for RGBA and ~27 for
    16-bit). Measured on a 9-Mpx PNG in a fresh process, plain and TTA, and in a batch of four (a batch keeps each
    photo's crops, not its decode)."""
    path = _large(tmp_path, kind)
    pixels = 3000 * 3000
    bound_mb = (9 * pixels) / 2**20 + 24   # + slack for the allocator and the crops
    results = [_measure(tiny_cnn_file, [[how, str(path)]], cap_mb=2048)[0]   # each in a fresh process
               for how in ('load_for_model', 'predict_files_tta', 'predict_files_batch')]
    assert all(outcome == 'ok' for _, _, outcome, _, _ in results), results
    over = [f'{how}: {grown_mb:.0f} MB' for how, _, _, _, grown_mb in results if grown_mb > bound_mb]
    assert not over, f'peak RSS grew by more than {bound_mb:.0f} MB: {over}'


def test_resize_shares_the_aspect_limit(cnn_model):
    """resize_center_crop / tta_views (training's validation crop, TTA) refuse an over-50:1 image at once,
    whoever made it, instead of allocating the resize; 50:1 itself is resized."""
    pp = cnn_model.flowers_preprocessing
    assert preprocess.MAX_ASPECT_RATIO == 50
    for size in [(1, 51), (51, 1), (2, 101)]:
        with pytest.raises(ValueError, match='longer side'):
            resize_center_crop(Image.new('RGB', size), pp)
        with pytest.raises(ValueError, match='longer side'):
            tta_views(Image.new('RGB', size), pp)
    assert resize_center_crop(Image.new('RGB', (1, 50)), pp).size == (pp.size, pp.size)
    assert len(tta_views(Image.new('RGB', (50, 1)), pp)) == 6


def test_the_resize_work_is_bounded_whatever_the_sidecar_allows(tmp_path):
    """An allowed sidecar (image_size 2048, crop_pct 0.25: a shorter side of 8192) and an allowed 50:1 photo asked
    for a 409600 x 8192 resize (~10 GB): refused, naming the photo, before any resize. A square photo still fits."""
    from flowers_fastai.preprocess import Preprocessing, load_for_model, resized_size
    pp = Preprocessing(2048, 0.25, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    with pytest.raises(ValueError, match='over the limit'):
        resized_size((2000, 40), pp)
    assert resized_size((300, 300), pp) == (8192, 8192)
    photo = tmp_path / 'long.png'
    Image.new('RGB', (2000, 40), (10, 200, 30)).save(photo)
    with pytest.raises(ValueError, match=str(photo)):
        load_for_model(photo, pp)


# ------------------------------------------------------------------------------------------ decoder errors of any type
@pytest.mark.parametrize('kind', ['dds_unknown_fourcc', 'dds_named_jpg', 'path_of_5000_chars',
                                  'file_name_of_300_chars', 'directory'])
def test_predict_turns_every_decoder_failure_into_the_value_error_naming_the_path(kind, tmp_path, cnn_model):
    path = bad_files(tmp_path)[kind]
    for given in (path, str(path)):
        with pytest.raises(ValueError) as err:
            predict(cnn_model, given)
        assert str(path) in str(err.value)


def test_a_path_with_a_nul_byte_and_a_fifo_are_value_errors_naming_them(tmp_path, cnn_model):
    fifo = tmp_path / 'pipe.jpg'
    os.mkfifo(fifo)
    for path in (tmp_path / 'a\0b.jpg', fifo):   # a FIFO would block a reader forever
        with pytest.raises(ValueError) as err:
            predict(cnn_model, path)
        assert str(path) in str(err.value)


def test_a_flat_psd_gets_a_class(tmp_path, cnn_model):
    """PIL decodes a PSD's flattened image; predict's `seek(0)` (a PSD's layers are frames 1...) raised."""
    path = flat_psd(tmp_path / 'flat.psd')
    assert predict(cnn_model, path) in CLASSES
    assert open_image(path).size == (4, 4)


DECODER_ERRORS = [NotImplementedError('Unimplemented pixel format'), RuntimeError('decoder crashed'),
                  KeyError('bad EXIF tag'), TypeError('unsupported operand'), ZeroDivisionError('division by zero'),
                  AssertionError(), EOFError('no more images'), struct.error('unpack requires a buffer'),
                  ValueError('tile cannot extend outside image'), OSError('broken data stream'),
                  RecursionError('maximum recursion depth exceeded'), MemoryError()]


@pytest.mark.parametrize('stage', ['open', 'load'])
@pytest.mark.parametrize('error', DECODER_ERRORS, ids=lambda e: type(e).__name__)
def test_an_exception_of_any_type_from_a_decoder_is_the_value_error_naming_the_path(error, stage, hostile_format,
                                                                                   tmp_path, cnn_model):
    """Whatever a plugin raises (MemoryError included: within the size limits it means this file is too large
    for the memory left, and the next photo goes on) is the documented ValueError naming the path."""
    path = hostile_format(tmp_path / 'crafted.jpg', error, stage)
    with pytest.raises(ValueError) as err:
        predict(cnn_model, path)
    assert str(path) in str(err.value)
    assert predict(cnn_model, PHOTOS[0]) in CLASSES   # and the next photo goes on


# ------------------------------------------------------------------------------------------ files that end early
@pytest.mark.parametrize('fmt', ['PNG', 'GIF', 'BMP', 'TIFF', 'JPEG'])
def test_a_truncated_file_is_still_used_with_a_warning(fmt, tmp_path, cnn_model):
    """Without the process-wide flag, what PIL decodes of a file that ends early is still used, and warned of."""
    source = tmp_path / f'source.{fmt.lower()}'
    Image.open(noisy_jpeg(tmp_path / 'noise.jpg', size=(120, 90))).save(source, fmt)
    path = truncated_copy(source, tmp_path / f'truncated.{fmt.lower()}')
    with pytest.warns(TruncatedImageWarning):
        assert predict(cnn_model, path) in CLASSES
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_image_reports_truncation_without_a_warning(tmp_path):
    from flowers_fastai.preprocess import decode_image
    path = truncated_copy(noisy_jpeg(tmp_path / 'src.jpg'), tmp_path / 'truncated.jpg')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        img, truncated = decode_image(path)
        assert truncated and img.mode == 'RGB' and img.size == (90, 90)
        img, truncated = decode_image(PHOTOS[0])
        assert not truncated
    with pytest.warns(TruncatedImageWarning):
        assert open_image(path).tobytes() == decode_image(path)[0].tobytes()


def _encoded(fmt: str) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.new('RGB', (64, 48), (200, 30, 60)).save(buffer, fmt)
    return buffer.getvalue()


def _header_only(fmt: str) -> bytes:
    data = _encoded(fmt)
    if fmt == 'JPEG':   # up to the end of the scan header: the entropy-coded pixels would follow
        sos = data.index(b'\xff\xda')
        return data[:sos + 2 + struct.unpack('>H', data[sos + 2:sos + 4])[0]]
    if fmt == 'PNG':    # IHDR, then the head of an IDAT chunk whose data is missing
        return data[:8] + png_chunk(b'IHDR', struct.pack('>IIBBBBB', 64, 48, 8, 2, 0, 0, 0)) + struct.pack('>I', 100) \
            + b'IDAT'
    if fmt == 'BMP':    # file and info headers: the pixel array would start at their end
        return data[:struct.unpack('<I', data[10:14])[0]]
    if fmt == 'GIF':    # header, screen descriptor and palette: no image descriptor
        return data[:data.index(b',')]
    return data[:8]     # TIFF: the byte order mark and the offset of a directory that is not there


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'BMP', 'GIF', 'TIFF'])
def test_a_header_without_pixel_data_is_a_value_error_in_every_format(fmt, tmp_path, tiny_cnn_file):
    """One rule: JPEG, PNG and BMP headers with no pixel data got a class of a blank picture (and a truncation
    warning) where GIF and TIFF gave ValueError. A file cut inside its pixel data still gets a class."""
    model = load_cnn_model(tiny_cnn_file)
    path = tmp_path / f'header.{fmt.lower()}'
    path.write_bytes(_header_only(fmt))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # PIL's own chatter on a broken TIFF
        with pytest.raises(ValueError, match=str(path)):
            predict(model, path)
    if fmt in ('JPEG', 'PNG', 'BMP'):
        with pytest.raises(ValueError, match='no pixel data'):
            open_image(path)
        cut = tmp_path / f'cut.{fmt.lower()}'
        header = len(_header_only(fmt)) - (8 if fmt == 'PNG' else 0)
        cut.write_bytes(_encoded(fmt)[:header + (len(_encoded(fmt)) - header) // 2])   # half of the pixel data
        with pytest.warns(TruncatedImageWarning):
            assert predict(model, cut) in CLASSES


# ---------------------------------------------------------------------------- no process-wide state changed by decoding
def test_threads_decoding_bombs_and_truncated_photos_change_no_global_state(tmp_path, tiny_pixel_limit,
                                                                           fast_thread_switches):
    truncated = [truncated_copy(noisy_jpeg(tmp_path / f'src{i}.jpg', seed=i), tmp_path / f'truncated{i}.jpg')
                 for i in range(3)]
    intact = [noisy_jpeg(tmp_path / 'intact.jpg', seed=9)]
    jobs = ([('truncated', p) for p in truncated] + [('bomb', p) for p in tiny_pixel_limit]
            + [('intact', p) for p in intact]) * 80
    flag_before = ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter('always')
        filters_before = list(warnings.filters)
        results = decode_concurrently(jobs, n_threads=8)
        filters_after = list(warnings.filters)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is flag_before is False
    assert filters_after == filters_before, 'decoding changed the warning filters'
    check_outcomes(results, recorded)
