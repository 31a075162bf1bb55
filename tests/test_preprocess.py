"""The inference preprocessing computes what the plain recipe computes: resize the shorter side then center-crop,
ImageNet / CLIP normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_fastai.preprocess import (cnn_preprocessing, open_image, resize_center_crop, to_normalized_tensor,
                                       vit_preprocessing)

from .conftest import EXAMPLES

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
