"""Photos decoded once into memory and augmented as batches (`--cache-size`): the same split, labels and
validation tensors as the disk pipeline, random crops per photo, and training, resizing and resuming on it."""
from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch

from flowers_fastai.data import flower_dataloaders, split_photos
from flowers_fastai.photo_cache import BatchCropAugment, PhotoCache, cached_datablock, crop_boxes
from flowers_fastai.preprocess import cnn_preprocessing
from flowers_fastai.training import train

from .helpers import TINY_CNN, interrupt_after_first_epoch


def test_crop_boxes_follow_random_resized_crop():
    rng = random.Random(0)
    boxes = crop_boxes(500, 60, 80, 0.35, rng=rng)
    assert boxes.shape == (500, 5) and boxes[:, 0].tolist() == list(range(500))
    w, h = boxes[:, 3] - boxes[:, 1], boxes[:, 4] - boxes[:, 2]
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 80).all() and (boxes[:, 2] >= 0).all() and (boxes[:, 4] <= 60).all()
    area = w * h / (60 * 80)
    assert area.min() >= 0.33 and area.max() <= 1.0 and area.std() > 0.1   # rounding: 0.35 of the area, about
    aspect = w / h
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35 and len(set(boxes[:, 1].tolist())) > 20


def test_each_photo_of_a_batch_gets_its_own_crop_and_augmentation():
    from fastai.vision.all import TensorImage
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64) % 251
    batch = TensorImage(torch.cat([x] * 4).to(torch.uint8))   # 8 photos, pairs of identical ones
    out = BatchCropAugment(32, 0.2, randaugment=2, color_jitter=0.4)(batch, split_idx=0)
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.uint8 and isinstance(out, TensorImage)
    assert not torch.equal(out[0], out[2])   # the same photo, another crop
    assert torch.equal(BatchCropAugment(32)(batch, split_idx=1), batch)   # validation batches pass as they are
    whole = BatchCropAugment(64, min_scale=1.0)
    whole_out = whole(TensorImage(batch[:1]), split_idx=0)   # the whole photo at its own size: roi_align is exact
    assert whole_out.shape[-1] == 64 and torch.equal(whole_out[0], batch[0]), \
        'a crop of the whole photo at its own size should give the photo back'


@pytest.fixture(scope='module')
def two_folders(colour_folder, tmp_path_factory):
    """The colour folder and a second one (other colours' noise), as two data folders."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp('second')
    rng = np.random.default_rng(1)
    for i, c in enumerate(sorted(p.name for p in colour_folder.iterdir())):
        (root / c).mkdir()
        for k in range(8):
            base = np.array(Image.open(sorted((colour_folder / c).glob('*.jpg'))[0]), dtype=float)
            pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels[:32, :44]).save(root / c / f'second{k}.png')
    return [colour_folder, root]


def test_validation_batches_are_the_disk_pipelines_to_the_bit(two_folders):
    photos = split_photos(two_folders, 'stratified', 0.25, 0)
    pp = cnn_preprocessing(32)
    disk = flower_dataloaders(photos.frame, pp, bs=8)
    cache = PhotoCache(photos.frame, 48)
    memory = cached_datablock(cache, pp).dataloaders(photos.frame, bs=8)
    assert list(memory.valid_ds.items.path) == list(disk.valid_ds.items.path)
    for (xd, yd), (xm, ym) in zip(disk.valid, memory.valid):
        assert torch.equal(yd, ym)
        torch.testing.assert_close(xm, xd, atol=0, rtol=0)
    xb, yb = memory.one_batch()
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and abs(float(xb.mean())) < 3
    assert len(cache.train) == len(photos.train_idx) and all(t.shape == (3, 48, 48) for t in cache.train.values())
    memory.show_batch(max_n=4)   # fastai's show_batch decodes it like any image batch


def test_training_on_two_folders_from_memory_reports_each_folder_resizes_and_resumes(two_folders, tmp_path,
                                                                                      monkeypatch):
    run = tmp_path / 'run'
    recipe = TINY_CNN.override(epochs=2, cache_size=48, resize_to=40, resize_epochs=1, split_seed=0)
    resume = interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, two_folders, run, pretrained=False, split='stratified')
    resume()
    learn = train(recipe, two_folders, run, pretrained=False, resume=True)
    history = pd.read_csv(run / 'history.csv')
    names = [p.name for p in two_folders]
    assert list(history.columns) == ['phase', 'epoch', 'train_loss', 'valid_loss', 'accuracy',
                                     *[f'accuracy_{n}' for n in names], 'time']
    assert list(history.phase) == ['scratch', 'scratch', 'resized40']
    assert learn.dls.one_batch()[0].shape[-1] == 40
    metrics = json.loads((run / 'metrics.json').read_text())
    config = json.loads((run / 'config.json').read_text())
    assert config['data'] == [str(p.resolve()) for p in two_folders] and config['recipe']['cache_size'] == 48
    # each folder's accuracy, recomputed from the best weights' predictions on its own validation photos
    preds, targs = learn.get_preds(dl=learn.dls.valid)
    right = (preds.argmax(-1) == targs).numpy()
    sources = learn.dls.valid.items['source'].to_numpy()
    for k, name in enumerate(names):
        assert metrics['valid_accuracy_by_folder'][name] == pytest.approx(right[sources == k].mean())
    best = history[history.phase == 'resized40'].iloc[-1]
    assert best[f'accuracy_{names[0]}'] == pytest.approx(metrics['valid_accuracy_by_folder'][names[0]])
