"""Probabilities for photos, beyond one argmax: calibrated (temperature scaling), test-time augmentation (TTA),
ensembles of models, and batches of files. No fastai: `submit`, the prediction CLI, evaluation and the web demo
all go through here.

A model is a `Served` network returned by `submit.load_cnn_model` / `load_vit_model` (it declares its
preprocessing and temperature) or an `Ensemble` of them (`submit.load_ensemble`).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from .labels import CLASSES
from .preprocess import (DRAFT_FLOOR, Preprocessing, center_crop, check_resize, open_image, resize_center_crop,
                         resize_shorter_side, to_normalized_tensor)


class Served(nn.Module):
    """What every model that `submit` returns declares, in this one place: its family, the preprocessing of its
    input, and its calibration temperature T (probabilities = softmax(logits / T)). The delivery networks
    (`inference_nets`) and `Ensemble` are Served; `serve` makes a built network servable (eval mode, no
    gradients) and says how to feed it."""
    flowers_family: str | None = None
    flowers_preprocessing: Preprocessing | None = None   # None: not servable yet (`members` refuses it)
    flowers_temperature: float = 1.0

    def serve(self, family: str, preprocessing: Preprocessing, temperature: float = 1.0) -> 'Served':
        self.flowers_family, self.flowers_preprocessing = family, preprocessing
        self.flowers_temperature = float(temperature)
        return self.eval().requires_grad_(False)


class Ensemble(Served):
    """Members whose calibrated probabilities are averaged. Each member keeps its own preprocessing, so
    `forward` takes one input per member; it returns log(mean probability), so that softmax of the output is
    the ensemble's probability and its argmax the ensemble's class, as for a single model."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members or any(not _servable(m) for m in members):
            raise TypeError('an Ensemble is made of models returned by load_cnn_model() / load_vit_model()')
        self.members = nn.ModuleList(members)
        self.flowers_family = 'ensemble'   # temperature 1.0: the members are calibrated one by one

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        probabilities = [calibrated_softmax(member, member(x)) for member, x in zip(self.members, inputs)]
        return torch.stack(probabilities).mean(0).log()


def members(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, Ensemble):
        return list(model.members)
    if not _servable(model):
        raise TypeError('expected a model returned by load_cnn_model(), load_vit_model() or load_ensemble(), '
                        f'not {type(model).__name__}')
    return [model]


def _servable(model) -> bool:
    return isinstance(model, Served) and model.flowers_preprocessing is not None


def calibrated_softmax(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T), T the model's fitted temperature (1.0 when it was not calibrated)."""
    return (logits.float() / model.flowers_temperature).softmax(dim=-1)


def load_image(image_path: str | os.PathLike, model: nn.Module) -> Image.Image:
    """The photo, decoded once for every member of `model` (the same bad-input contract as `submit.predict`)."""
    pps = [m.flowers_preprocessing for m in members(model)]
    img = open_image(image_path, draft_min_side=max(DRAFT_FLOOR, 2 * max(pp.resize_to for pp in pps)))
    check_resize(image_path, img, pps)   # before any resize work
    return img


def tta_views(img: Image.Image, pp: Preprocessing) -> list[Image.Image]:
    """Test-time augmentation: the center crop and the two crops at the ends of the longer side (the same
    resize as inference, done once), each as is and mirrored: 6 views."""
    resized = resize_shorter_side(img, pp)
    rw, rh = resized.size
    first, last = ((0, (rh - pp.size) // 2), (rw - pp.size, (rh - pp.size) // 2)) if rw >= rh else \
                  (((rw - pp.size) // 2, 0), ((rw - pp.size) // 2, rh - pp.size))
    crops = [center_crop(resized, pp)] + [resized.crop((x, y, x + pp.size, y + pp.size)) for x, y in (first, last)]
    return crops + [crop.transpose(Image.FLIP_LEFT_RIGHT) for crop in crops]


def model_views(img: Image.Image, model: nn.Module, tta: bool = False) -> list[list[Image.Image]]:
    """The crops each member of `model` takes from one decoded photo: its center crop, or its 6 TTA views."""
    return [tta_views(img, m.flowers_preprocessing) if tta else [resize_center_crop(img, m.flowers_preprocessing)]
            for m in members(model)]


def image_tensor(img: Image.Image, pp: Preprocessing, tta: bool = False) -> torch.Tensor:
    """The model input of one decoded photo: 1 x 3 x S x S, or its 6 TTA views (6 x 3 x S x S)."""
    views = tta_views(img, pp) if tta else [resize_center_crop(img, pp)]
    return torch.cat([to_normalized_tensor(view, pp) for view in views])


@torch.inference_mode()
def probabilities(model: nn.Module, images: list[Image.Image], tta: bool = False) -> torch.Tensor:
    """N x 5 calibrated class probabilities of decoded photos (one batch per member; TTA averages the
    probabilities of the views of each photo)."""
    return views_probabilities(model, [model_views(img, model, tta) for img in images])


@torch.inference_mode()
def views_probabilities(model: nn.Module, views: list[list[list[Image.Image]]]) -> torch.Tensor:
    """`probabilities` from the `model_views` of each photo."""
    per_member = []
    for k, member in enumerate(members(model)):
        pp = member.flowers_preprocessing
        x = torch.cat([to_normalized_tensor(view, pp) for photo in views for view in photo[k]])
        p = calibrated_softmax(member, member(x))
        per_member.append(p.view(len(views), -1, len(CLASSES)).mean(1))
    return torch.stack(per_member).mean(0)


def as_dict(p: torch.Tensor) -> dict[str, float]:
    return {name: float(v) for name, v in zip(CLASSES, p.tolist())}


@dataclass
class FileResult:
    """One file's outcome: its probabilities, or why it could not be classified."""
    path: Path
    probabilities: dict[str, float] | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        return max(self.probabilities, key=self.probabilities.get) if self.probabilities else None


def _decode_all(paths: list[Path], model: nn.Module, tta: bool) -> list[list[list[Image.Image]] | Exception]:
    """Each file's crops for the model (`model_views`), or its error. Only the crops are kept: a batch of
    large photos never holds their full-size decodes at once."""
    decoded = []
    for path in paths:
        try:
            decoded.append(model_views(load_image(path, model), model, tta))
        except Exception as err:   # noqa: BLE001 - one file's failure, of any type, is its row; the rest go on
            decoded.append(err)
    return decoded


def predict_files(model: nn.Module, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                  tta: bool = False) -> Iterator[FileResult]:
    """Classify files in batches, in order. The next batch is decoded in a background thread while the model
    runs on this one (PIL releases the GIL while decoding and resizing). A file that cannot be decoded becomes
    a result with its error; the others go on."""
    paths = [Path(p) for p in paths]
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode_all, batches[0], model, tta) if batches else None
        for i, batch in enumerate(batches):
            decoded = pending.result()
            pending = pool.submit(_decode_all, batches[i + 1], model, tta) if i + 1 < len(batches) else None
            views = [v for v in decoded if not isinstance(v, Exception)]
            probs = iter(views_probabilities(model, views) if views else [])
            for path, img in zip(batch, decoded):
                if isinstance(img, Exception):
                    yield FileResult(path, error=f'{type(img).__name__}: {img}')
                else:
                    p = as_dict(next(probs))
                    if not all(math.isfinite(v) for v in p.values()):
                        yield FileResult(path, error='the model gave non-finite scores')
                    else:
                        yield FileResult(path, probabilities=p)
