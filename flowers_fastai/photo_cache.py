"""Photos decoded once into memory, augmented as batches of tensors: the data pipeline that keeps a 2-core CPU on
the model (`--cache-size N`).

The disk pipeline (`data.flower_datablock`) decodes every photo again each epoch and augments it with PIL, one
photo at a time, in the process that trains: on this project's CPU that took a large share of each step (see
docs/speed.md). Here:

- training photos are decoded once, squashed to `cache_size` x `cache_size` pixels (RandomResizedCrop jitters the
  aspect ratio by up to 4:3 anyway) and kept as one uint8 tensor;
- validation photos are kept as the exact eval crop that `submit` makes (`preprocess.resize_center_crop`), at the
  size being trained, so validation accuracy is what the delivered file scores;
- each training batch is cropped and resized per photo in one `torchvision.ops.roi_align` call (a box per photo,
  averaging several samples per output pixel, so a 256 px photo shrunk to 96 px does not alias as fastai's
  `RandomResizedCropGPU`, a bilinear grid sample, does), then RandAugment + ColorJitter per photo on uint8
  tensors (torchvision v2), then fastai's usual batch transforms (`aug_transforms`, Normalize, RandomErasing).

It is a fastai DataBlock like the disk one: same splitter, same labels, same `show_batch`.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, IntToFloatTensor, Normalize, RandomErasing,
                               TensorImage, Transform, TransformBlock, aug_transforms)
from PIL import Image

from .labels import CLASSES
from .preprocess import Preprocessing, open_image, resize_center_crop


def decode_photo(path, size: int) -> torch.Tensor:
    """One photo as a 3 x size x size uint8 tensor (opened as `submit` opens it, squashed to a square)."""
    img = open_image(path, draft_min_side=size).resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def eval_crop(path, pp: Preprocessing) -> torch.Tensor:
    """The photo exactly as `submit` feeds it (resize the shorter side, center crop), as uint8 CHW."""
    img = resize_center_crop(open_image(path, draft_min_side=pp.resize_to), pp)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class PhotoCache:
    """The decoded photos of a split (`frame`: path, is_valid): training photos once at `cache_size`, validation
    photos as eval crops at the size asked for (decoded again only when the size changes)."""

    def __init__(self, frame: pd.DataFrame, cache_size: int):
        self.cache_size = cache_size
        train = frame.loc[~frame['is_valid'], 'path'].tolist()
        self.valid_paths = frame.loc[frame['is_valid'], 'path'].tolist()
        self.train = {str(p): decode_photo(p, cache_size) for p in train}
        self.valid, self.valid_size = {}, None

    def at(self, pp: Preprocessing) -> 'PhotoCache':
        if self.valid_size != pp.size:
            self.valid = {str(p): eval_crop(p, pp) for p in self.valid_paths}
            self.valid_size = pp.size
        return self

    def __getitem__(self, path) -> torch.Tensor:
        key = str(path)
        return self.train[key] if key in self.train else self.valid[key]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in (*self.train.values(), *self.valid.values()))


class CachedPhoto(Transform):
    """path -> its decoded uint8 tensor, from the cache (the DataBlock's type transform)."""

    def __init__(self, cache: PhotoCache):
        super().__init__()
        self.cache = cache

    def encodes(self, path) -> TensorImage:
        return TensorImage(self.cache[path])


@contextmanager
def one_thread():
    """Run small tensor ops on one intra-op thread. Per-photo ops on a 128 px photo take ~0.1 ms on one thread; on
    two, where another process keeps the cores busy, each waits for the second thread and took 15-45 ms (measured
    on this project's 2-core CPU). Switching costs ~0.06 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def crop_boxes(n: int, height: int, width: int, min_scale: float, ratio=(3 / 4, 4 / 3), rng=random) -> torch.Tensor:
    """torchvision's RandomResizedCrop box sampling (area in [min_scale, 1] of the photo, log-uniform aspect ratio,
    10 tries then the whole photo), one box per photo, as roi_align's rows (index, x1, y1, x2, y2)."""
    boxes, area = [], height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        for _ in range(10):
            target = area * rng.uniform(min_scale, 1.0)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                break
        else:
            x, y, w, h = 0, 0, width, height
        boxes.append((i, x, y, x + w, y + h))
    return torch.tensor(boxes, dtype=torch.float32)


class BatchCropAugment(Transform):
    """Training batches only: a random resized crop per photo to `size` (one roi_align call), then RandAugment
    and ColorJitter per photo on uint8 (torchvision v2; composed here because timm's `create_transform` drops
    ColorJitter whenever RandAugment is on, and the recipe wants both)."""
    split_idx, order = 0, 5   # before IntToFloatTensor (10): RandAugment's posterize / solarize want uint8

    def __init__(self, size: int, min_scale: float = 0.35, randaugment: int = 0, randaugment_magnitude: int = 9,
                 color_jitter: float = 0.0):
        super().__init__()
        from torchvision.transforms import v2
        self.size, self.min_scale = size, min_scale
        steps = [v2.RandAugment(randaugment, randaugment_magnitude)] if randaugment else []
        steps += [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.photo_steps = v2.Compose(steps) if steps else None

    def encodes(self, x: TensorImage) -> TensorImage:
        with one_thread():
            return self._augment(x)

    def _augment(self, x: TensorImage) -> TensorImage:
        from torchvision.ops import roi_align
        n, _, height, width = x.shape
        boxes = crop_boxes(n, height, width, self.min_scale).to(x.device)
        # sampling_ratio -1: ceil(box / output) samples per output pixel and axis, averaged (no aliasing)
        crops = roi_align(x.as_subclass(torch.Tensor).float(), boxes, (self.size, self.size), aligned=True)
        crops = crops.round_().clamp_(0, 255).to(torch.uint8)
        if self.photo_steps is not None:
            crops = torch.stack([self.photo_steps(photo) for photo in crops])
        return TensorImage(crops)


def cached_datablock(cache: PhotoCache, pp: Preprocessing, min_scale: float = 0.35, augment: bool = True,
                     randaugment: int = 0, randaugment_magnitude: int = 9, color_jitter: float = 0.0,
                     random_erasing: float = 0.0) -> DataBlock:
    """The disk DataBlock's twin (`data.flower_datablock`: same options, same splitter, same labels) over photos
    decoded once (`cache`), augmented per batch."""
    from .data import StratifiedSplitter
    cache.at(pp)
    batch_tfms = [BatchCropAugment(pp.size, min_scale, randaugment, randaugment_magnitude, color_jitter)]
    batch_tfms += aug_transforms(size=None, max_rotate=10.0, max_warp=0.1) if augment else []
    batch_tfms.append(Normalize.from_stats(pp.mean, pp.std))
    if random_erasing:
        batch_tfms.append(RandomErasing(p=random_erasing, max_count=1))  # after Normalize: fills with noise
    return DataBlock(
        blocks=(TransformBlock(type_tfms=CachedPhoto(cache), batch_tfms=IntToFloatTensor),
                CategoryBlock(vocab=CLASSES)),
        get_x=ColReader('path'), get_y=ColReader('label'), splitter=StratifiedSplitter(),
        batch_tfms=batch_tfms,
    )
