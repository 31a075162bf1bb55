"""Shared fixtures. Every test runs with the network blocked (sockets refuse to connect), so "offline" is
checked, not trusted; a test marked `loopback` may reach this machine only (a local server, a browser driver).
Real photos come from ../shared/data/flowers; tests that need them skip when it is absent."""
from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO.parent / 'shared' / 'data' / 'flowers'
EXAMPLES = REPO / 'examples'

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


def real_photos(per_class: int = 2) -> dict[str, list[Path]]:
    """A few real photos per class from the shared data folder (skips the test when it is absent)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f'real photos not available: {DATA_DIR} is absent')
    from flowers_fastai.labels import CLASSES
    return {c: sorted((DATA_DIR / c).glob('*.jpg'))[:per_class] for c in CLASSES}


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


COLOURS = {'daisy': (240, 240, 240), 'dandelion': (250, 210, 0), 'rose': (200, 0, 30),
           'sunflower': (255, 140, 0), 'tulip': (150, 0, 200)}


@pytest.fixture(scope='module')
def colour_folder(tmp_path_factory):
    """An easy, learnable data set: each class is a noisy photo of its own colour (12 per class)."""
    root = tmp_path_factory.mktemp('colours')
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(12):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.jpg', quality=95)
    return root
