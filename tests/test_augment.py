"""Training augmentation: RandAugment and ColorJitter both really applied, Random Erasing, and a deterministic
validation pipeline whatever the training augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fastai.vision.all import RandomErasing
from PIL import Image
from torchvision import transforms as T

from flowers_fastai.data import flower_dataloaders, scan_image_folder
from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import cnn_preprocessing, load_for_model


@pytest.fixture(scope='module')
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / c / f'{i}.jpg')
    return scan_image_folder(root).items


def count_calls(monkeypatch, cls):
    calls = []
    original = cls.forward

    def forward(self, img):
        calls.append(1)
        return original(self, img)
    monkeypatch.setattr(cls, 'forward', forward)
    return calls


def test_randaugment_and_colorjitter_are_both_applied_to_training_photos_only(items, monkeypatch):
    randaugment, jitter = count_calls(monkeypatch, T.RandAugment), count_calls(monkeypatch, T.ColorJitter)
    pp = cnn_preprocessing(32)
    dls = flower_dataloaders(items, pp, bs=6, valid_pct=0.2, randaugment=2, color_jitter=0.4)
    dls.train.one_batch()
    assert len(randaugment) >= 6 and len(jitter) == len(randaugment)   # every training photo gets both
    before = len(jitter)
    valid_x, _ = dls.valid.one_batch()
    assert len(jitter) == before and len(randaugment) == before       # validation gets neither
    paths = list(dls.valid_ds.items.path[:len(valid_x)])
    expected = torch.cat([load_for_model(p, pp) for p in paths])
    torch.testing.assert_close(valid_x.cpu(), expected, atol=1e-5, rtol=0)  # the submit preprocessing


def test_no_photo_augmentation_unless_asked(items, monkeypatch):
    jitter = count_calls(monkeypatch, T.ColorJitter)
    dls = flower_dataloaders(items, cnn_preprocessing(32), bs=6, valid_pct=0.2)
    dls.train.one_batch()
    assert not jitter


def test_random_erasing_is_a_training_batch_transform_after_normalize(items):
    dls = flower_dataloaders(items, cnn_preprocessing(32), bs=6, valid_pct=0.2, random_erasing=0.25)
    tfms = list(dls.train.after_batch.fs)
    erasing = [t for t in tfms if isinstance(t, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].p == 0.25 and erasing[0].split_idx == 0
    assert [type(t).__name__ for t in tfms].index('RandomErasing') > [type(t).__name__ for t in tfms].index('Normalize')
    assert not any(isinstance(t, RandomErasing) for t in flower_dataloaders(
        items, cnn_preprocessing(32), bs=6, valid_pct=0.2).train.after_batch.fs)
