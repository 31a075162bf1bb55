"""Hostile images against the decoding that `predict`, the batch CLI, evaluation, training's data scan and the
demo share (`preprocess.open_image`; issue 12):

- extreme shapes (a 277-byte 1 x 100000 PNG) and large images stay within the memory bound of docs/api.md: a class or
  the documented ValueError, measured in fresh processes under an address-space cap;
- a decoder error of any type (an unknown DDS pixel format, a flat PSD, a path too long to open...) is the
  documented ValueError naming the path in `predict`, one error row in `predict_files`, one unreadable file in
  `scan_image_folder`, a 400 in the demo; the rest goes on;
- decoding changes no process-wide state: threads decoding truncated JPEGs and bombs at once refuse every bomb,
  warn once per truncated photo, and leave `ImageFile.LOAD_TRUNCATED_IMAGES` and the warning filters alone.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from flowers_fastai import preprocess
from flowers_fastai.inference import predict_files, tta_views
from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import TruncatedImageWarning, open_image, resize_center_crop
from flowers_fastai.submit import load_cnn_model, predict

from .conftest import EXAMPLES, REPO

PHOTOS = sorted(EXAMPLES.glob('*.jpg'))


@pytest.fixture(scope='module')
def cnn_model(tiny_cnn_file):
    return load_cnn_model(tiny_cnn_file)


# ------------------------------------------------------------------------------------------ crafted files
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)


def _gray_png(path: Path, width: int, height: int) -> Path:
    """A complete 8-bit grayscale PNG of zeros: a 1 x 100000 one is 277 bytes."""
    rows = (b'\x00' + b'\x00' * width) * height
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
                     + _png_chunk(b'IDAT', zlib.compress(rows, 9)) + _png_chunk(b'IEND', b''))
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height RGB and whose data is 16 bytes: nothing large on disk."""
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                     + _png_chunk(b'IDAT', zlib.compress(b'\x00' * 16)) + _png_chunk(b'IEND', b''))
    return path


def _dds_unknown_fourcc(path: Path) -> Path:
    """An 8x8 DDS whose pixel format is the FourCC 'ZZZZ': PIL raises NotImplementedError on it."""
    header = struct.pack('<7I', 124, 0x1007, 8, 8, 0, 0, 0) + b'\0' * 44
    header += struct.pack('<4I', 32, 0x4, int.from_bytes(b'ZZZZ', 'little'), 0) + b'\0' * 16
    header += struct.pack('<5I', 0x1000, 0, 0, 0, 0)
    path.write_bytes(b'DDS ' + header + b'\0' * 64)
    return path


def _flat_psd(path: Path) -> Path:
    """A 4x4 RGB Photoshop file with no layers (only the flattened image, raw): PIL decodes it."""
    header = b'8BPS' + struct.pack('>H', 1) + b'\0' * 6 + struct.pack('>HIIHH', 3, 4, 4, 8, 3)
    path.write_bytes(header + struct.pack('>I', 0) * 3 + struct.pack('>H', 0) + bytes(range(0, 240, 5)))
    return path


def _noisy_jpeg(path: Path, size=(90, 90), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


# A format of our own whose decoder raises what a crafted file makes some PIL plugin raise: any type.
HOSTILE_MAGIC = b'HOSTILE!'


class _HostileImageFile(ImageFile.ImageFile):
    """Raises the exception registered for its file name in `errors`, in `_open` or in `load`."""
    format, format_description = 'HOSTILE', 'raises whatever the test asks, in open or load'
    errors: dict[str, tuple[BaseException, str]] = {}

    def _error(self, stage):
        error, when = self.errors[Path(self.filename).name]
        if when == stage:
            raise error

    def _open(self):
        self.fp.read(len(HOSTILE_MAGIC))
        self._mode, self._size, self.tile = 'RGB', (8, 8), []
        self._error('open')

    def load(self):
        self._error('load')
        raise AssertionError('unreachable')


@pytest.fixture
def hostile_format(monkeypatch):
    """Registers the HOSTILE format for this test only; returns `write(path, error, stage='load')`, which
    writes such a file, whose decoder raises `error` at `stage` ('open' or 'load')."""
    Image.init()   # every plugin registered now, into the list restored afterwards, not into ours
    monkeypatch.setattr(Image, 'ID', ['HOSTILE', *Image.ID])
    monkeypatch.setitem(Image.OPEN, 'HOSTILE', (_HostileImageFile, lambda prefix: prefix.startswith(HOSTILE_MAGIC)))
    monkeypatch.setattr(_HostileImageFile, 'errors', {})

    def write(path: Path, error: BaseException, stage: str = 'load') -> Path:
        _HostileImageFile.errors[path.name] = (error, stage)
        path.write_bytes(HOSTILE_MAGIC + b'\0' * 64)
        return path
    return write


# ------------------------------------------------------- class: extreme shapes and large images, memory bound
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
    and the peak RSS grows by a few MB at most, under a cap (at HEAD: MemoryError, or gigabytes without it)."""
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
    copy; conversions run in stripes). Measured on a 9-Mpx PNG in a fresh process, plain and TTA (at HEAD the
    RGBA one took ~23 bytes per pixel, the 16-bit one ~27), and in a batch of four (HEAD held all four
    decodes)."""
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


# ---------------------------------------------------- class: decoder errors of any type, everywhere
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / 'a_folder.jpg').mkdir(exist_ok=True)
    return {
        'dds_unknown_fourcc': _dds_unknown_fourcc(tmp_path / 'texture.dds'),
        'dds_named_jpg': _dds_unknown_fourcc(tmp_path / 'texture.jpg'),
        'path_of_5000_chars': tmp_path / ('x' * 5000 + '.jpg'),
        'file_name_of_300_chars': tmp_path / ('y' * 300 + '.jpg'),
        'directory': tmp_path / 'a_folder.jpg',
    }


@pytest.mark.parametrize('kind', ['dds_unknown_fourcc', 'dds_named_jpg', 'path_of_5000_chars',
                                  'file_name_of_300_chars', 'directory'])
def test_predict_turns_every_decoder_failure_into_the_value_error_naming_the_path(kind, tmp_path, cnn_model):
    path = _bad_files(tmp_path)[kind]
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
    path = _flat_psd(tmp_path / 'flat.psd')
    assert predict(cnn_model, path) in CLASSES
    assert open_image(path).size == (4, 4)


def test_a_missing_path_stays_file_not_found(tmp_path, cnn_model):
    for path in (tmp_path / 'nope.jpg', tmp_path / 'nope' / 'deeper.jpg', tmp_path / ('a/' * 1000 + 'b.jpg')):
        with pytest.raises(FileNotFoundError):
            predict(cnn_model, path)


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


def test_predict_files_gives_one_error_row_per_bad_file_and_classifies_the_rest(tmp_path, cnn_model,
                                                                               hostile_format):
    bad = _bad_files(tmp_path / 'bad')
    crafted = hostile_format(tmp_path / 'crafted.png', NotImplementedError('Unimplemented pixel format'))
    flat = _flat_psd(tmp_path / 'flat.psd')
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


def _deeper_than_path_max(top: Path) -> Path:
    """Folders 20 deep of 250-character names under `top`, a photo at the bottom: made through directory file
    descriptors, since no path reaches there. Returns the first folder whose path is over PATH_MAX (4096)."""
    fd, path, first_too_long = os.open(top, os.O_RDONLY), top, None
    try:
        for i in range(20):
            name = chr(ord('a') + i) * 250
            os.mkdir(name, dir_fd=fd)
            fd, old = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            path = path / name
            if first_too_long is None and len(os.fsencode(path)) >= 4096:
                first_too_long = path
        with open(os.open('deep.jpg', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), 'wb') as f:
            f.write(PHOTOS[0].read_bytes())
    finally:
        os.close(fd)
    return first_too_long


def test_the_training_scan_lists_each_undecodable_file_and_keeps_the_others(tmp_path, hostile_format):
    pytest.importorskip('fastai')
    from flowers_fastai.data import scan_image_folder
    root = tmp_path / 'data'
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(2):
            _noisy_jpeg(root / c / f'{c}{i}.jpg', seed=10 * k + i)
    dds = _dds_unknown_fourcc(root / 'rose' / 'texture.jpg')
    crafted = hostile_format(root / 'tulip' / 'crafted.png', RuntimeError('decoder crashed'))
    memory = hostile_format(root / 'daisy' / 'memory.png', MemoryError())
    too_deep = _deeper_than_path_max(root / 'sunflower')
    with pytest.warns(UserWarning, match='left out 4 unreadable photo'):
        scanned = scan_image_folder(root)
    assert {p for p, _ in scanned.unreadable} == {dds, crafted, memory, too_deep}
    assert all(str(p) in why for p, why in scanned.unreadable)
    assert len(scanned.items) == 2 * len(CLASSES) and scanned.counts() == {c: 2 for c in CLASSES}


def test_the_demo_answers_400_for_an_unknown_dds_pixel_format(tiny_cnn_file, tmp_path):
    pytest.importorskip('starlette', reason='the web demo extra is not installed: pip install -e .[demo]')
    pytest.importorskip('multipart', reason='the web demo extra is not installed: pip install -e .[demo]')
    from starlette.testclient import TestClient

    from flowers_fastai.app import create_app
    data = _dds_unknown_fourcc(tmp_path / 'texture.dds').read_bytes()
    with TestClient(create_app(load_cnn_model(tiny_cnn_file))) as client:
        for name in ('texture.dds', 'texture.jpg'):
            response = client.post('/predict', files={'file': (name, data, 'image/jpeg')})
            assert response.status_code == 400, response.text
            assert name in response.json()['error']
        ok = client.post('/predict', files={'file': ('rose.jpg', PHOTOS[0].read_bytes(), 'image/jpeg')})
        assert ok.status_code == 200 and ok.json()['class'] in CLASSES


# ------------------------------------------------------------ class: no process-wide state changed by decoding
@pytest.fixture
def tiny_pixel_limit(monkeypatch, tmp_path):
    """PIL's bomb limit lowered for this test, so that bombs and photos can both be tiny: 120x120 lies between
    1x and 2x the limit (PIL only warns there), 300x300 over 2x (PIL raises)."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)
    return [_png_header_only(tmp_path / 'bomb_warn_only.png', 120, 120),
            _png_header_only(tmp_path / 'bomb.png', 300, 300)]


@pytest.fixture
def fast_thread_switches():
    """Threads switch every 10 us instead of 5 ms: races, where there are any, show in a few hundred decodes."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _decode_concurrently(jobs: list[tuple[str, Path]], n_threads: int, extra=None) -> list[tuple[str, object]]:
    """Run open_image on every (kind, path) job over `n_threads` threads (and `extra()` in one more thread,
    looping until the jobs are done); returns (kind, image or exception) per job."""
    results, lock, done = [], threading.Lock(), threading.Event()

    def worker(share):
        for kind, path in share:
            try:
                outcome = open_image(path)
            except Exception as err:   # noqa: BLE001 - recorded, checked by the test
                outcome = err
            with lock:
                results.append((kind, outcome))

    def loop_extra():
        while not done.is_set():
            extra()
    threads = [threading.Thread(target=worker, args=(jobs[i::n_threads],)) for i in range(n_threads)]
    side = threading.Thread(target=loop_extra) if extra else None
    for t in threads + ([side] if side else []):
        t.start()
    for t in threads:
        t.join()
    done.set()
    if side:
        side.join()
    return results


def _check_outcomes(results, recorded):
    truncated = [outcome for kind, outcome in results if kind == 'truncated']
    assert len(truncated) and all(isinstance(o, Image.Image) for o in truncated), \
        [o for o in truncated if not isinstance(o, Image.Image)][:3]
    bombs = [outcome for kind, outcome in results if kind == 'bomb']
    slipped = [o for o in bombs if not isinstance(o, ValueError)]
    assert not slipped, f'{len(slipped)} of {len(bombs)} bombs were decoded'
    assert all(isinstance(o, Image.Image) for kind, o in results if kind == 'intact')
    warned = [w for w in recorded if issubclass(w.category, TruncatedImageWarning)]
    assert len(warned) == len(truncated), f'{len(warned)} truncation warnings for {len(truncated)} truncated photos'


def test_threads_decoding_bombs_and_truncated_photos_change_no_global_state(tmp_path, tiny_pixel_limit,
                                                                           fast_thread_switches):
    truncated = [_truncated(_noisy_jpeg(tmp_path / f'src{i}.jpg', seed=i), tmp_path / f'truncated{i}.jpg')
                 for i in range(3)]
    intact = [_noisy_jpeg(tmp_path / 'intact.jpg', seed=9)]
    jobs = ([('truncated', p) for p in truncated] + [('bomb', p) for p in tiny_pixel_limit]
            + [('intact', p) for p in intact]) * 80
    flag_before = ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter('always')
        filters_before = list(warnings.filters)
        results = _decode_concurrently(jobs, n_threads=8)
        filters_after = list(warnings.filters)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is flag_before is False
    assert filters_after == filters_before, 'decoding changed the warning filters'
    _check_outcomes(results, recorded)


def test_the_training_scan_loses_no_other_threads_truncation_warning(tmp_path, tiny_pixel_limit,
                                                                   fast_thread_switches):
    """scan_image_folder ran its decodes under warnings.catch_warnings + 'ignore': while it scanned, other
    threads' TruncatedImageWarnings vanished (and the filters could be left changed)."""
    pytest.importorskip('fastai')
    from flowers_fastai.data import scan_image_folder
    root = tmp_path / 'data'
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(3):
            _noisy_jpeg(root / c / f'{c}{i}.jpg', seed=10 * k + i)
    _truncated(_noisy_jpeg(tmp_path / 'src.jpg', seed=99), root / 'rose' / 'truncated.jpg')
    truncated = [_truncated(_noisy_jpeg(tmp_path / f'src{i}.jpg', seed=i), tmp_path / f'truncated{i}.jpg')
                 for i in range(3)]
    jobs = ([('truncated', p) for p in truncated] + [('bomb', p) for p in tiny_pixel_limit]) * 60
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter('always')
        filters_before = list(warnings.filters)
        scans = []
        results = _decode_concurrently(jobs, n_threads=4, extra=lambda: scans.append(scan_image_folder(root)))
        filters_after = list(warnings.filters)
    assert scans and all(len(s.items) == 16 and not s.unreadable for s in scans)   # the truncated one is kept
    assert filters_after == filters_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    _check_outcomes(results, recorded)


@pytest.mark.parametrize('fmt', ['PNG', 'GIF', 'BMP', 'TIFF', 'JPEG'])
def test_a_truncated_file_is_still_used_with_a_warning(fmt, tmp_path, cnn_model):
    """Without the process-wide flag, what PIL decodes of a file that ends early is still used, and warned of."""
    source = tmp_path / f'source.{fmt.lower()}'
    Image.open(_noisy_jpeg(tmp_path / 'noise.jpg', size=(120, 90))).save(source, fmt)
    path = _truncated(source, tmp_path / f'truncated.{fmt.lower()}')
    with pytest.warns(TruncatedImageWarning):
        assert predict(cnn_model, path) in CLASSES
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_image_reports_truncation_without_a_warning(tmp_path):
    from flowers_fastai.preprocess import decode_image
    path = _truncated(_noisy_jpeg(tmp_path / 'src.jpg'), tmp_path / 'truncated.jpg')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        img, truncated = decode_image(path)
        assert truncated and img.mode == 'RGB' and img.size == (90, 90)
        img, truncated = decode_image(PHOTOS[0])
        assert not truncated
    with pytest.warns(TruncatedImageWarning):
        assert open_image(path).tobytes() == decode_image(path)[0].tobytes()


# ------------------------------------------------------------------------------------------ a header, no pixels
def _encoded(fmt: str) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.new('RGB', (64, 48), (200, 30, 60)).save(buffer, fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)


def _header_only(fmt: str) -> bytes:
    data = _encoded(fmt)
    if fmt == 'JPEG':   # up to the end of the scan header: the entropy-coded pixels would follow
        sos = data.index(b'\xff\xda')
        return data[:sos + 2 + struct.unpack('>H', data[sos + 2:sos + 4])[0]]
    if fmt == 'PNG':    # IHDR, then the head of an IDAT chunk whose data is missing
        return data[:8] + _chunk(b'IHDR', struct.pack('>IIBBBBB', 64, 48, 8, 2, 0, 0, 0)) + struct.pack('>I', 100) \
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
