"""What several test modules share besides fixtures (those are in conftest.py): the repository's paths, the
colour data set, the tiny training recipe and run-folder helpers, stand-ins for published pretrained files, files
that carry code, the photos and hostile files the decoding tests craft, and the command-line helpers of the
predict and evaluate tests."""
from __future__ import annotations

import csv
import os
import re
import shutil
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import TruncatedImageWarning, open_image
from flowers_fastai.recipes import CNN, TEACHER
from flowers_fastai.submit import load_cnn_model, load_vit_model, predict, predict_proba

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / 'shared' / 'data' / 'flowers'
EXAMPLES = REPO / 'examples'
PHOTOS = sorted(EXAMPLES.glob('*.jpg'))   # the five example photos


# ------------------------------------------------------------------------------------------ data
def real_photos(per_class: int = 2) -> dict[str, list[Path]]:
    """A few real photos per class from the shared data folder (skips the test when it is absent)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f'real photos not available: {DATA_DIR} is absent')
    return {c: sorted((DATA_DIR / c).glob('*.jpg'))[:per_class] for c in CLASSES}


COLOURS = {'daisy': (240, 240, 240), 'dandelion': (250, 210, 0), 'rose': (200, 0, 30),
           'sunflower': (255, 140, 0), 'tulip': (150, 0, 200)}


def colour_pixels(rgb, rng) -> np.ndarray:
    """A 48 x 40 noisy photo of one colour: the colour data set's photos, easy to learn."""
    return np.clip(np.array(rgb) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)


def colour_photo(path: Path, rgb, seed: int) -> None:
    """One photo of the colour data set at `path`, its noise seeded on its own (so that a folder can be
    changed photo by photo)."""
    pixels = colour_pixels(rgb, np.random.default_rng(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def colour_data_folder(root: Path, counts: dict[str, int] | None = None) -> Path:
    """The colour data set (12 photos per class unless `counts` says otherwise), named like Flickr photos."""
    for k, (name, rgb) in enumerate(COLOURS.items()):
        for i in range((counts or {}).get(name, 12)):
            colour_photo(root / name / f'{1000000 * (k + 1) + i}_x.jpg', rgb, seed=100 * k + i)
    return root


# ------------------------------------------------------------------------------------------ tiny runs
# Tests of the training machinery run without the brief's regularisation (tested on its own), at the given LR.
PLAIN = dict(randaugment=0, color_jitter=0.0, random_erasing=0.0, mixup=0.0, cutmix=0.0, ema_decay=0.0, patience=0,
             lr_base_bs=0)
TINY_CNN = CNN.override(arch='convnextv2_atto', size=32, bs=8, epochs=1, lr=1e-3, drop_path=0.0, valid_pct=0.25,
                        **PLAIN)
TINY_EMA = TINY_CNN.override(ema_decay=0.9)   # models/last.pth holds the weight average too
TINY_TEACHER = TEACHER.override(arch='test_efficientnet', size=32, bs=8, epochs=1, freeze_epochs=1, valid_pct=0.25,
                                **PLAIN)


def fastai_logits(learn, paths):
    """The learner's own logits for `paths`, through fastai's test pipeline: what an exported file must give."""
    dl = learn.dls.test_dl(paths, bs=len(paths))
    learn.model.eval()
    with torch.no_grad():
        (x,) = dl.one_batch()
        return learn.model(x)


class StageSpy:
    """Records, at the first training batch of every fit (phase), which parameter groups train and their LRs."""

    def __init__(self):
        self.phases = []

    def callback(self):
        from fastai.vision.all import Callback
        spy = self

        class Spy(Callback):
            def before_fit(self):
                self.first = True

            def after_batch(self):
                if self.training and self.first:
                    self.first = False
                    groups = self.learn.splitter(self.learn.model)
                    spy.phases.append({
                        'trains': [all(p.requires_grad for p in g) for g in groups],
                        'frozen': [not any(p.requires_grad for p in g) for g in groups],
                        'lr': [h['lr'] for h in self.learn.opt.hypers]})
        return Spy()


def resume_point(run: Path) -> dict:
    """The run's resume point, models/last.pth: model, optimizer, EMA, phase, epoch, best."""
    return torch.load(Path(run) / 'models' / 'last.pth', map_location='cpu', weights_only=True)


def set_resume_position(run: Path, phase: int, epoch: int, best=None) -> None:
    """Rewrite the position in the run's resume point, its weights kept (a run as it looked earlier)."""
    saved = resume_point(run)
    saved.update(phase=phase, epoch=epoch, best=best)
    torch.save(saved, Path(run) / 'models' / 'last.pth')


def interrupt_after_first_epoch(monkeypatch):
    """Make training stop with a KeyboardInterrupt right after its first epoch's resume point is written, as
    an interrupted run would; returns the function that puts training back."""
    from flowers_fastai.callbacks import ResumableCheckpoint
    original = ResumableCheckpoint.after_epoch

    def crash_after_first_epoch(self):
        original(self)
        if self.epoch == 0:
            raise KeyboardInterrupt('simulated interruption')
    monkeypatch.setattr(ResumableCheckpoint, 'after_epoch', crash_after_first_epoch)
    return lambda: monkeypatch.setattr(ResumableCheckpoint, 'after_epoch', original)


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a finished run folder, for a test to damage without touching the module's run."""
    shutil.copytree(run, dest)
    return dest


def truncate_file(path: Path) -> None:
    """Cut the file to its first half: what a crash or a full disk mid-write leaves."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------------ published pretrained files
def randomized(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every floating tensor replaced by fresh normal noise (same shape and dtype), contiguous and unshared."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone()).contiguous()
            for k, v in state_dict.items()}


def timm_convnextv2_source(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """What timm publishes for `arch`: the 1000-class ImageNet model's state_dict, here with random values."""
    import timm
    return randomized(timm.create_model(arch, pretrained=False, num_classes=1000).state_dict(), seed)


def timm_to_fb(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of timm's convnext `checkpoint_filter_fn` (FB -> timm): timm names back to Facebook's, GRN
    parameters back to their 1x1x1xC shape and the pointwise 1x1 convs back to Facebook's 2-D nn.Linear weights."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stem\.(\d)\.', r'downsample_layers.0.\1.', k)
        k = re.sub(r'^stages\.(\d)\.downsample\.(\d)\.', r'downsample_layers.\1.\2.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = k.replace('conv_dw.', 'dwconv.').replace('mlp.fc1.', 'pwconv1.').replace('mlp.fc2.', 'pwconv2.')
        if re.search(r'\.pwconv[12]\.weight$', k):   # FB: nn.Linear (out, in); timm: 1x1 conv (out, in, 1, 1)
            v = v.reshape(v.shape[0], v.shape[1])
        if '.mlp.grn.' in k:
            k = k.replace('mlp.grn.weight', 'grn.gamma').replace('mlp.grn.bias', 'grn.beta')
            v = v.reshape(1, 1, 1, -1)
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v.clone()
    return out


def write_cnn_file(state_dict: dict[str, torch.Tensor], folder: Path, fmt: str) -> Path:
    """`state_dict` (timm names) in one of the published file formats."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == 'safetensors':        # timm on the Hugging Face hub: model.safetensors
        from safetensors.torch import save_file
        path = folder / 'model.safetensors'
        save_file(state_dict, str(path))
    elif fmt in ('bin', 'pth'):     # timm's pytorch_model.bin / a .pth: torch.save of the state_dict
        path = folder / ('pytorch_model.bin' if fmt == 'bin' else 'convnextv2_atto.pth')
        torch.save(state_dict, path)
    elif fmt == 'fb':               # Facebook's original release: {'model': {...FB names...}}
        path = folder / 'convnextv2_atto_1k_224_ema.pt'
        torch.save({'model': timm_to_fb(state_dict)}, path)
    else:
        raise AssertionError(fmt)
    return path


# ------------------------------------------------------------------------------------------ files that carry code
class RunsCode:
    """Unpickling this calls exec(): writes a marker file. A safe loader must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({str(self.marker)!r}, "w").write("code ran")',))


def torch_load_calls(monkeypatch) -> list:
    """Spy on torch.load for the rest of the test: the list of each call's weights_only argument, to check that
    nothing is read with weights_only=False (which would run code in a crafted file)."""
    calls, original = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, 'load', spy)
    return calls


def crafted_torch_file(path: Path, marker: Path, payload: dict | None = None) -> Path:
    """A torch file holding `payload` (real tensors) and a pickle that runs code when loaded unsafely."""
    torch.save({**(payload or {}), 'evil': RunsCode(marker)}, path)
    return path


# ------------------------------------------------------------------------------------------ the delivery API
def predict_strict(model, path):
    """predict, with any TruncatedImageWarning turned into an error: intact images must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', TruncatedImageWarning)
        result = predict(model, path)
    assert isinstance(result, str)
    assert result in CLASSES
    return result


LOADERS = {'cnn': load_cnn_model, 'vit': load_vit_model}


def photo_answers(model) -> list[tuple[str, dict[str, float]]]:
    """predict and predict_proba on three example photos: what no mode, thread or change of file may alter."""
    return [(predict(model, photo), predict_proba(model, photo)) for photo in PHOTOS[:3]]


# -------------------------------------------------------------------------------------- photos of every mode and format
def rgb_jpeg(path):
    Image.new('RGB', (48, 36), (200, 30, 40)).save(path / 'rgb.jpg')
    return path / 'rgb.jpg'


def rgba_png(path):
    img = Image.new('RGBA', (40, 40), (0, 0, 0, 0))
    img.paste((250, 220, 10, 255), (10, 10, 30, 30))
    img.save(path / 'rgba.png')
    return path / 'rgba.png'


def _palette(path):
    Image.new('RGB', (40, 30), (20, 160, 40)).convert('P', palette=Image.Palette.ADAPTIVE).save(path / 'p.png')
    assert Image.open(path / 'p.png').mode == 'P'
    return path / 'p.png'


def palette_transparency_png(path):
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


def gray16_png(path):
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


def animated_gif(path):
    frames = [Image.new('RGB', (32, 32), (255, 0, 0)), Image.new('RGB', (32, 32), (0, 0, 255))]
    frames[0].save(path / 'anim.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path / 'anim.gif') as check:
        assert getattr(check, 'n_frames', 1) == 2
    return path / 'anim.gif'


def exif_jpeg(path, orientation):
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
    'rgb_jpeg': rgb_jpeg, 'rgba_png': rgba_png, 'palette_png': _palette,
    'palette_transparency_png': palette_transparency_png, 'grayscale_L': _gray, 'cmyk_jpeg': _cmyk,
    'gray16_png': gray16_png, 'bilevel_1bit': _bilevel, 'webp': _webp, 'bmp': _bmp, 'animated_gif': animated_gif,
    'exif6_jpeg': lambda p: exif_jpeg(p, 6), 'exif8_jpeg': lambda p: exif_jpeg(p, 8), 'no_extension': _no_extension,
    'tiny_4x4': _tiny,
}


# ------------------------------------------------------------------------------------------ crafted and hostile files
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny (<100 bytes) PNG whose IHDR declares width x height RGB: nothing large exists on disk."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b'\x00' * 16)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', ihdr) + png_chunk(b'IDAT', idat)
                     + png_chunk(b'IEND', b''))
    return path


def _between_1x_and_2x_side() -> int:
    side = int((1.5 * Image.MAX_IMAGE_PIXELS) ** 0.5)
    assert Image.MAX_IMAGE_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS
    return side


def bomb_over_2x(p):
    return png_header_only(p / 'bomb.png', 40000, 40000)


def bomb_between_1x_and_2x(p):
    side = _between_1x_and_2x_side()
    return png_header_only(p / 'bomb_warn_only.png', side, side)


def dds_unknown_fourcc(path: Path) -> Path:
    """An 8x8 DDS whose pixel format is the FourCC 'ZZZZ': PIL raises NotImplementedError on it."""
    header = struct.pack('<7I', 124, 0x1007, 8, 8, 0, 0, 0) + b'\0' * 44
    header += struct.pack('<4I', 32, 0x4, int.from_bytes(b'ZZZZ', 'little'), 0) + b'\0' * 16
    header += struct.pack('<5I', 0x1000, 0, 0, 0, 0)
    path.write_bytes(b'DDS ' + header + b'\0' * 64)
    return path


def flat_psd(path: Path) -> Path:
    """A 4x4 RGB Photoshop file with no layers (only the flattened image, raw): PIL decodes it."""
    header = b'8BPS' + struct.pack('>H', 1) + b'\0' * 6 + struct.pack('>HIIHH', 3, 4, 4, 8, 3)
    path.write_bytes(header + struct.pack('>I', 0) * 3 + struct.pack('>H', 0) + bytes(range(0, 240, 5)))
    return path


def noisy_jpeg(path: Path, size=(90, 90), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def truncated_copy(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def bad_files(tmp_path: Path) -> dict[str, Path]:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / 'a_folder.jpg').mkdir(exist_ok=True)
    return {
        'dds_unknown_fourcc': dds_unknown_fourcc(tmp_path / 'texture.dds'),
        'dds_named_jpg': dds_unknown_fourcc(tmp_path / 'texture.jpg'),
        'path_of_5000_chars': tmp_path / ('x' * 5000 + '.jpg'),
        'file_name_of_300_chars': tmp_path / ('y' * 300 + '.jpg'),
        'directory': tmp_path / 'a_folder.jpg',
    }


def decode_concurrently(jobs: list[tuple[str, Path]], n_threads: int, extra=None) -> list[tuple[str, object]]:
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


def check_outcomes(results, recorded):
    truncated = [outcome for kind, outcome in results if kind == 'truncated']
    assert len(truncated) and all(isinstance(o, Image.Image) for o in truncated), \
        [o for o in truncated if not isinstance(o, Image.Image)][:3]
    bombs = [outcome for kind, outcome in results if kind == 'bomb']
    slipped = [o for o in bombs if not isinstance(o, ValueError)]
    assert not slipped, f'{len(slipped)} of {len(bombs)} bombs were decoded'
    assert all(isinstance(o, Image.Image) for kind, o in results if kind == 'intact')
    warned = [w for w in recorded if issubclass(w.category, TruncatedImageWarning)]
    assert len(warned) == len(truncated), f'{len(warned)} truncation warnings for {len(truncated)} truncated photos'


# ------------------------------------------------------------------------------------------ command lines
# what a spreadsheet runs as a formula at the start of a cell (OWASP, CSV injection)
FORMULA_TRIGGERS = ('=', '+', '-', '@', '\t', '\r')
GOOD_RAW, BAD_RAW = b'\xff\xfe.jpg', b'\xfe\xff-broken.jpg'   # not UTF-8: os.fsdecode gives surrogates
# what PIL's plugins can raise on crafted files, besides the documented ValueError / FileNotFoundError
PIL_OPEN_ERRORS = [KeyError('bad EXIF tag'), TypeError('unsupported operand'), ZeroDivisionError('division by zero'),
                   RuntimeError('decoder crashed'), IndexError('tuple index out of range')]


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


def assert_formula_safe(rows: list[list[str]]) -> None:
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_TRIGGERS), (cell, row)
