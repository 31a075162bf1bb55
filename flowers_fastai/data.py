"""The data: scanning a folder of class folders, stratified seeded splits (grouped by duplicates, see audit.py),
training augmentation, and the fastai DataBlock."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, ImageBlock, Normalize, PILImage, RandomErasing,
                               RandomResizedCrop, TrainTestSplitter, Transform, aug_transforms)
from sklearn.model_selection import StratifiedGroupKFold

from .data_files import scan_folder
from .labels import CLASSES
from .preprocess import Preprocessing, decode_image, open_image, resize_center_crop


class DatasetError(ValueError):
    """The photo folder cannot be trained on as it is (said before any training starts)."""


@dataclass
class ScannedFolder:
    """The usable photos of a folder of class folders, and what was left out."""
    items: list[tuple[Path, str]]
    non_images: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self.items]

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(c) for c in CLASSES}


def scan_image_folder(root: str | Path, check_decodable: bool = True) -> ScannedFolder:
    """List `root/<class>/**/<photo>` with normalised class names (`Roses/` -> 'rose').

    Raises `DatasetError` for a missing root, an unknown folder, a missing or empty class. Files that are
    not images are skipped with one warning that counts them; with `check_decodable`, every photo is
    decoded once (cheaply, with JPEG draft mode) so that an unreadable one is reported now instead of
    crashing an epoch later.
    """
    root = Path(root)
    found = scan_folder(root, strict=True, error=DatasetError)
    missing = [c for c in CLASSES if c not in found.folders]
    if missing:
        names = sorted(folder.name for folders in found.folders.values() for folder in folders)   # each one
        raise DatasetError(f'{root}: no folder for class(es) {missing}; found {names}')

    scanned = ScannedFolder(items=[], non_images=found.non_images, unreadable=found.unreadable)
    for path, label in found.items:
        if check_decodable:
            try:   # decode_image: no TruncatedImageWarning, and no warning filter changed for it
                decode_image(path, draft_min_side=16)
            except (FileNotFoundError, ValueError) as err:   # every decoder failure is a ValueError
                scanned.unreadable.append((path, str(err)))
                continue
        scanned.items.append((path, label))
    if scanned.non_images:
        warnings.warn(f'{root}: skipped {len(scanned.non_images)} file(s) that are not images '
                      f'(e.g. {scanned.non_images[0]})')
    if scanned.unreadable:
        listing = '\n  '.join(f'{p}: {why}' for p, why in scanned.unreadable)
        warnings.warn(f'{root}: left out {len(scanned.unreadable)} unreadable photo(s):\n  {listing}')
    empty = [c for c, n in scanned.counts().items() if n == 0]
    if empty:
        raise DatasetError(f'{root}: class(es) {empty} have no usable photo')
    return scanned


def _check_split_size(labels: list[str], valid_pct: float) -> None:
    n_classes, n_valid = len(set(labels)), int(np.ceil(valid_pct * len(labels)))
    if n_valid < n_classes or len(labels) - n_valid < n_classes:
        raise DatasetError(f'{len(labels)} photos are too few for a stratified {valid_pct:.0%} validation split: '
                           f'each side needs at least one photo of each of the {n_classes} classes')


def stratified_split(labels: list[str], valid_pct: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Train and validation indices with each class in the same proportion on both sides, fixed by `seed`."""
    _check_split_size(labels, valid_pct)
    train, valid = TrainTestSplitter(test_size=valid_pct, random_state=seed, stratify=labels)(labels)
    return sorted(train), sorted(valid)


def grouped_stratified_split(labels: list[str], groups, valid_pct: float = 0.2,
                             seed: int = 0) -> tuple[list[int], list[int]]:
    """A stratified split that keeps every group (copies of one photo) on one side: fold 0 of sklearn's
    `StratifiedGroupKFold` with round(1 / valid_pct) folds (valid_pct 0.2 -> 5 folds -> 20 %)."""
    _check_split_size(labels, valid_pct)
    folds = StratifiedGroupKFold(n_splits=max(2, round(1 / valid_pct)), shuffle=True, random_state=seed)
    train, valid = next(folds.split(np.zeros(len(labels)), labels, groups))
    return sorted(train.tolist()), sorted(valid.tolist())


class StratifiedSplitter:
    """fastai splitter over a DataFrame of photos: stratified on its `label` column (fastai's
    `TrainTestSplitter(stratify=)`) and, when it has a `group` column (see `audit.py`), with each group of copies
    on one side, which fastai's splitters cannot do (sklearn's `StratifiedGroupKFold`)."""

    def __init__(self, valid_pct: float = 0.2, seed: int = 0):
        self.valid_pct, self.seed = valid_pct, seed

    def __call__(self, df: pd.DataFrame):
        if 'group' in df:
            return grouped_stratified_split(df['label'].tolist(), df['group'].tolist(), self.valid_pct, self.seed)
        return stratified_split(df['label'].tolist(), self.valid_pct, self.seed)


def items_frame(items: list[tuple[Path, str]], groups=None) -> pd.DataFrame:
    """The (path, label) items, and their duplicate groups if given, as the DataFrame the DataBlock reads."""
    df = pd.DataFrame({'path': [Path(p) for p, _ in items], 'label': [label for _, label in items]})
    if groups is not None:
        df['group'] = list(groups)
    return df


class FlowerImage(PILImage):
    """fastai image opened by `preprocess.open_image` (EXIF rotation, 16-bit, alpha... as `submit` does)."""

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str, Path)):
            return cls(open_image(fn))
        return super().create(fn, **kwargs)


class TrainRandomResizedCrop(RandomResizedCrop):
    """fastai's RandomResizedCrop on the training set only: validation gets `EvalResizeCrop` instead."""
    split_idx = 0


class EvalResizeCrop(Transform):
    """The deterministic inference crop of `submit` (resize shorter side, center crop), on validation/test."""
    split_idx, order = 1, 1

    def __init__(self, pp: Preprocessing):
        super().__init__()
        self.pp = pp

    def encodes(self, x: PILImage):
        return type(x)(resize_center_crop(x, self.pp))


class TrainPhotoAugment(Transform):
    """RandAugment then ColorJitter (torchvision) on training photos, after the random crop.

    Composed here because timm's `create_transform` silently drops ColorJitter whenever RandAugment is on;
    the seed's recipe wants both."""
    split_idx, order = 0, 2

    def __init__(self, randaugment_ops: int = 2, randaugment_magnitude: int = 9, color_jitter: float = 0.4):
        super().__init__()
        from torchvision import transforms as T
        steps = [T.RandAugment(randaugment_ops, randaugment_magnitude)] if randaugment_ops else []
        steps += [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.steps = T.Compose(steps)

    def encodes(self, x: PILImage):
        return type(x)(self.steps(x))


def flower_datablock(pp: Preprocessing, valid_pct: float = 0.2, seed: int = 0, min_scale: float = 0.35,
                     augment: bool = True, randaugment: int = 0, randaugment_magnitude: int = 9,
                     color_jitter: float = 0.0, random_erasing: float = 0.0) -> DataBlock:
    """DataBlock over a DataFrame of photos (`items_frame`). Training: random resized crop, optional
    RandAugment (`randaugment` ops) and ColorJitter, fastai's `aug_transforms` (flip, rotate, zoom, warp,
    lighting), optional Random Erasing (probability). Validation: the deterministic `submit` crop. Both: the
    model family's normalisation."""
    item_tfms = [TrainRandomResizedCrop(pp.size, min_scale=min_scale, resamples=(Image.BICUBIC, Image.NEAREST)),
                 EvalResizeCrop(pp)]
    if randaugment or color_jitter:
        item_tfms.append(TrainPhotoAugment(randaugment, randaugment_magnitude, color_jitter))
    batch_tfms = aug_transforms(size=None, max_rotate=10.0, max_warp=0.1) if augment else []
    batch_tfms.append(Normalize.from_stats(pp.mean, pp.std))
    if random_erasing:
        batch_tfms.append(RandomErasing(p=random_erasing, max_count=1))  # after Normalize: fills with noise
    return DataBlock(
        blocks=(ImageBlock(cls=FlowerImage), CategoryBlock(vocab=CLASSES)),
        get_x=ColReader('path'), get_y=ColReader('label'),
        splitter=StratifiedSplitter(valid_pct, seed),
        item_tfms=item_tfms, batch_tfms=batch_tfms,
    )


def flower_dataloaders(items: list[tuple[Path, str]], pp: Preprocessing, bs: int = 32, valid_pct: float = 0.2,
                       seed: int = 0, num_workers: int = 0, device=None, groups=None, **kwargs):
    return flower_datablock(pp, valid_pct, seed, **kwargs).dataloaders(
        items_frame(items, groups), bs=bs, num_workers=num_workers, device=device)
