"""Shared fixtures (the plain helpers several modules share are in helpers.py). Every test runs with the network
blocked (sockets refuse to connect), so "offline" is checked, not trusted; a test marked `loopback` may reach this
machine only (a local server, a browser driver). Real photos come from ../shared/data/flowers; tests that need
them skip when it is absent."""
from __future__ import annotations

import json
import shutil
import socket
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from flowers_fastai.submit import load_cnn_model, load_vit_model

from .helpers import COLOURS, TINY_EMA, colour_pixels, png_header_only

warnings.filterwarnings('ignore', category=FutureWarning)  # torch.jit deprecation chatter from open_clip/timm


class NetworkBlocked(OSError):
    pass


LOOPBACK_HOSTS = {'127.0.0.1', '::1', 'localhost'}


@pytest.fixture(autouse=True)
def no_network(request, monkeypatch):
    """Any attempt to open a network connection fails at once, as on a machine with no network. A test marked
    `loopback` may still connect to, and look up, LOOPBACK_HOSTS (its own server, a browser driver), nothing else."""
    loopback_allowed = request.node.get_closest_marker('loopback') is not None

    def refuse(*args, **kwargs):
        raise NetworkBlocked('network access blocked in tests')

    def refuse_inet(original):
        def connect(sock, *args, **kwargs):
            if sock.family == socket.AF_UNIX:   # local IPC (DataLoader workers) is not network
                return original(sock, *args, **kwargs)
            if loopback_allowed and isinstance(args[0], tuple) and args[0][0] in LOOPBACK_HOSTS:
                return original(sock, *args, **kwargs)
            refuse()
        return connect

    def loopback_only(original, host_of):
        def call(*args, **kwargs):
            return original(*args, **kwargs) if loopback_allowed and host_of(*args) in LOOPBACK_HOSTS else refuse()
        return call
    monkeypatch.setattr(socket.socket, 'connect', refuse_inet(socket.socket.connect))
    monkeypatch.setattr(socket.socket, 'connect_ex', refuse_inet(socket.socket.connect_ex))
    monkeypatch.setattr(socket, 'create_connection', loopback_only(socket.create_connection, lambda addr, *_: addr[0]))
    monkeypatch.setattr(socket, 'getaddrinfo', loopback_only(socket.getaddrinfo, lambda host, *_: host))


# ------------------------------------------------------------------------------------------ tiny delivery models
@pytest.fixture(scope='session')
def tiny_cnn_file(tmp_path_factory) -> Path:
    """A random-init convnextv2_atto CNN exported as submit expects it (raw state_dict + sidecar, 32 px)."""
    from flowers_fastai.architectures import build_cnn
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('weights') / 'cnn_flowers.pth'
    torch.save(build_cnn('convnextv2_atto').state_dict(), path)
    path.with_suffix('.json').write_text(json.dumps({'family': 'cnn', 'image_size': 32}))
    return path


TINY_CLIP_NAME = 'FlowersTest-ViT-quickgelu'
TINY_CLIP_CONFIG = {'embed_dim': 32, 'quick_gelu': True,
                    'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 8},
                    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 1}}


@pytest.fixture(scope='session')
def tiny_clip_name(tmp_path_factory) -> str:
    """An open_clip model config of a tiny CLIP ViT (32 px, 2 blocks), registered under TINY_CLIP_NAME."""
    import open_clip
    folder = tmp_path_factory.mktemp('clip_configs')
    (folder / f'{TINY_CLIP_NAME}.json').write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    return TINY_CLIP_NAME


@pytest.fixture(scope='session')
def tiny_vit_file(tmp_path_factory, tiny_clip_name) -> Path:
    """A random-init tiny CLIP ViT classifier exported as submit expects it (visual.* + head.*, sidecar)."""
    from flowers_fastai.architectures import ClipClassifier, clip_spec_from_open_clip
    torch.manual_seed(0)
    spec = clip_spec_from_open_clip(tiny_clip_name)
    path = tmp_path_factory.mktemp('weights') / 'vit_flowers.pth'
    torch.save(ClipClassifier(spec).state_dict(), path)
    path.with_suffix('.json').write_text(json.dumps({'family': 'vit', 'quick_gelu': True, 'head_width': 32}))
    return path


@pytest.fixture(scope='module')
def cnn_model(tiny_cnn_file):
    """The tiny CNN as submit loads it, shared by a module's tests (none changes it)."""
    return load_cnn_model(tiny_cnn_file)


@pytest.fixture(scope='module')
def vit_model(tiny_vit_file):
    """The tiny ViT as submit loads it, shared by a module's tests (none changes it)."""
    return load_vit_model(tiny_vit_file)


@pytest.fixture
def weights_files(tiny_cnn_file, tiny_vit_file):
    """The tiny weights files by family, for the tests parametrized over 'cnn' and 'vit'."""
    return {'cnn': tiny_cnn_file, 'vit': tiny_vit_file}


@pytest.fixture
def weights(tiny_cnn_file, tmp_path) -> Path:
    """A private copy of the tiny CNN and its sidecar: a test may try to overwrite it."""
    folder = tmp_path / 'weights'
    folder.mkdir()
    shutil.copy(tiny_cnn_file, folder / 'cnn_flowers.pth')
    shutil.copy(tiny_cnn_file.with_suffix('.json'), folder / 'cnn_flowers.json')
    return folder / 'cnn_flowers.pth'


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope='module')
def colour_folder(tmp_path_factory):
    """An easy, learnable data set: each class is a noisy photo of its own colour (12 per class)."""
    root = tmp_path_factory.mktemp('colours')
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(12):
            pixels = colour_pixels(rgb, rng)
            Image.fromarray(pixels).save(root / name / f'{i}.jpg', quality=95)
    return root


@pytest.fixture(scope='module')
def cnn_run(colour_folder, tmp_path_factory) -> Path:
    """One finished tiny CNN run (1 epoch, EMA on): every file a run folder holds. Tests copy it."""
    from flowers_fastai.training import train
    run = tmp_path_factory.mktemp('runs') / 'cnn-a'
    train(TINY_EMA, colour_folder, run, pretrained=False)
    return run


# ------------------------------------------------------------------------------------------ decoders that fail
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


@pytest.fixture
def tiny_pixel_limit(monkeypatch, tmp_path):
    """PIL's bomb limit lowered for this test, so that bombs and photos can both be tiny: 120x120 lies between
    1x and 2x the limit (PIL only warns there), 300x300 over 2x (PIL raises)."""
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)
    return [png_header_only(tmp_path / 'bomb_warn_only.png', 120, 120),
            png_header_only(tmp_path / 'bomb.png', 300, 300)]


@pytest.fixture
def fast_thread_switches():
    """Threads switch every 10 us instead of 5 ms: races, where there are any, show in a few hundred decodes."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)
