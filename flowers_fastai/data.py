"""The data: scanning a folder of class folders, stratified seeded splits (grouped by duplicates, see audit.py),
training augmentation, and the fastai DataBlock."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from fastai.vision.all import (CategoryBlock, ColReader, DataBlock, ImageBlock, Normalize, PILImage, RandomErasing,
                               RandomResizedCrop, TrainTestSplitter, Transform, aug_transforms)
from sklearn.model_selection import StratifiedGroupKFold

from .audit import Audit, audit_items, duplicate_groups, flickr_id, listed_pairs, perceptual_hashes
from .data_files import folder_names, scan_folder
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
    """fastai splitter over a DataFrame of photos: its `is_valid` column when it has one (the split of several
    folders, `split_photos`); else stratified on its `label` column (fastai's `TrainTestSplitter(stratify=)`)
    and, when it has a `group` column (see `audit.py`), with each group of copies on one side, which fastai's
    splitters cannot do (sklearn's `StratifiedGroupKFold`)."""

    def __init__(self, valid_pct: float = 0.2, seed: int = 0):
        self.valid_pct, self.seed = valid_pct, seed

    def __call__(self, df: pd.DataFrame):
        if 'is_valid' in df:   # drawn already (`split_photos`): training and re-scoring share one split
            return np.flatnonzero(~df['is_valid'].to_numpy()).tolist(), np.flatnonzero(df['is_valid']).tolist()
        if 'group' in df:
            return grouped_stratified_split(df['label'].tolist(), df['group'].tolist(), self.valid_pct, self.seed)
        return stratified_split(df['label'].tolist(), self.valid_pct, self.seed)


def items_frame(items: list[tuple[Path, str]], groups=None) -> pd.DataFrame:
    """The (path, label) items, and their duplicate groups if given, as the DataFrame the DataBlock reads."""
    df = pd.DataFrame({'path': [Path(p) for p, _ in items], 'label': [label for _, label in items]})
    if groups is not None:
        df['group'] = list(groups)
    return df


def data_folders(data) -> list[Path]:
    """`--data` as a list of folders: one folder, several, or what config.json recorded (one path as a string
    before runs could read several folders, a list since)."""
    folders = [data] if isinstance(data, (str, Path)) else list(data)
    if not folders:
        raise DatasetError('no data folder given')
    return [Path(f) for f in folders]


@dataclass
class PhotoSplit:
    """The photos of one or several folders and their train/validation split (`split_photos`).

    `items`: every usable photo of every folder, folder by folder, as scanned; `frame`: the photos that train or
    validate (items left out by the audit are not there), with columns path, label, source (the folder's index),
    index (its row in `items`) and is_valid; `audit`: duplicate groups over `items`, across folders (None for a
    stratified split)."""
    folders: list[Path]
    items: list[tuple[Path, str]]
    frame: pd.DataFrame
    audit: Audit | None = None
    dropped: Counter = field(default_factory=Counter)   # photos left out by the audit, per class

    @property
    def train_idx(self) -> list[int]:
        return self.frame.loc[~self.frame['is_valid'], 'index'].tolist()

    @property
    def valid_idx(self) -> list[int]:
        return self.frame.loc[self.frame['is_valid'], 'index'].tolist()

    @property
    def names(self) -> list[str]:
        return folder_names(self.folders)


def split_photos(data, split: str = 'grouped', valid_pct: float = 0.2, seed: int = 0,
                 limit_items: int | None = None) -> PhotoSplit:
    """The photos of `data` (one folder or several) and their stratified, seeded train/validation split.

    Each folder is split on its own, stratified by class, so that the first folder gets exactly the split it
    gets alone: students trained on more folders are compared with older ones on the same validation photos.
    'grouped' (see `audit.py`): copies of one photo stay on one side, also across folders (a later folder's group
    of copies follows its copy in an earlier folder), and photos filed under two classes are left out, in one
    folder or across two; 'stratified': photos split independently. `limit_items`: a class-balanced subset of
    that many photos, shared among the folders by size (smoke tests)."""
    if split not in ('grouped', 'stratified'):
        raise ValueError(f'split must be "grouped" or "stratified", not {split!r}')
    # absolute (valid_items.csv is read from anywhere), links kept: the photos keep the paths the user gave
    folders = [Path(os.path.abspath(folder)) for folder in data_folders(data)]
    scanned = [scan_image_folder(root).items for root in folders]
    if limit_items is not None:
        total = sum(map(len, scanned))
        scanned = [stratified_subset(items, limit_items if len(folders) == 1 else round(limit_items * len(items)
                                                                                       / total), seed)
                   for items in scanned]
    items = [item for folder in scanned for item in folder]
    source = np.concatenate([np.full(len(folder), k) for k, folder in enumerate(scanned)])
    is_valid = np.zeros(len(items), dtype=bool)
    kept = np.ones(len(items), dtype=bool)
    audit = None
    if split == 'grouped':
        hashes = perceptual_hashes([path for path, _ in items])
        offsets = np.cumsum([0, *map(len, scanned)])
        folder_audits = [audit_items(scanned[k], hashes=hashes[offsets[k]:offsets[k + 1]])
                         for k in range(len(folders))]
        for k, folder_audit in enumerate(folder_audits):
            print(f'{folders[k]}: ' + folder_audit.report().splitlines()[0])
            kept[offsets[k]:offsets[k + 1]] = np.isin(np.arange(len(scanned[k])), folder_audit.kept())
        paths = [path for path, _ in items]
        audit = Audit(items, duplicate_groups(hashes, keys=[flickr_id(p) for p in paths], pairs=listed_pairs(paths)))
        _check_class_sizes(items, kept, folders, limit_items)
        for k, folder_audit in enumerate(folder_audits):
            rows = np.flatnonzero(kept[offsets[k]:offsets[k + 1]])
            _, valid = grouped_stratified_split([scanned[k][i][1] for i in rows], folder_audit.group[rows],
                                                valid_pct, seed)
            is_valid[offsets[k] + rows[valid]] = True
            if k:
                _follow_copies_in_earlier_folders(audit, folder_audit.group, offsets[k], source, kept, is_valid)
    else:
        _check_class_sizes(items, kept, folders, limit_items)
        for k in range(len(folders)):
            rows = np.flatnonzero(source == k)
            _, valid = stratified_split([items[i][1] for i in rows], valid_pct, seed)
            is_valid[rows[valid]] = True
    frame = pd.DataFrame({'path': [Path(p) for p, _ in items], 'label': [label for _, label in items],
                          'source': source, 'index': np.arange(len(items)), 'is_valid': is_valid})[kept]
    dropped = Counter(items[i][1] for i in np.flatnonzero(~kept))
    return PhotoSplit(folders, items, frame.reset_index(drop=True), audit, dropped)


def _follow_copies_in_earlier_folders(audit: Audit, folder_group: np.ndarray, offset: int, source: np.ndarray,
                                      kept: np.ndarray, is_valid: np.ndarray) -> None:
    """A later folder's group of copies whose photo has a copy in an earlier folder goes to that copy's side of
    the split, whole; where the copies carry different labels, the later folder's group is left out."""
    k = source[offset]
    rows = np.flatnonzero(source == k)
    for group in np.unique(folder_group):
        members = rows[folder_group == group]
        members = members[kept[members]]
        anchors = [i for i in np.flatnonzero(np.isin(audit.group, audit.group[members]))
                   if source[i] < k and kept[i]]
        if not len(members) or not anchors:
            continue
        anchor = min(anchors)
        if any(audit.items[i][1] != audit.items[anchor][1] for i in members):
            kept[members] = False
        else:
            is_valid[members] = is_valid[anchor]


def _check_class_sizes(items, kept: np.ndarray, folders: list[Path], limit_items) -> None:
    """Every class needs a photo on each side of the split: at least 2 usable ones. Without this an emptied
    class (all its photos copies of photos filed under another class, left out by the audit) trains on, and its
    accuracy is 0/0 in metrics.json."""
    counts = Counter(items[i][1] for i in np.flatnonzero(kept))
    dropped = Counter(items[i][1] for i in np.flatnonzero(~kept))
    data = ' '.join(str(f) for f in folders)
    for c in CLASSES:
        if counts[c] >= 2:
            continue
        why = (f' after the audit left out {dropped[c]} of its photos as copies of photos filed under another class '
               f'(listed by `python train.py audit --data {data}`)' if dropped[c] else '')
        todo = (f'remove each copy from the folder where it does not belong, or add other photos of {c}'
                if dropped[c] else f'add photos of {c}')
        if limit_items is not None:
            todo += ', or raise --limit'
        raise DatasetError(f'class {c!r} has {counts[c]} usable photo(s){why}; every class needs at least 2 (one for '
                           f'training, one for validation): {todo}')


def stratified_subset(items, n, seed):
    """A small class-balanced subset (for smoke tests and quick trials)."""
    if n >= len(items):
        return items
    _, keep = stratified_split([label for _, label in items], valid_pct=n / len(items), seed=seed)
    return [items[i] for i in keep]


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
    the brief's recipe wants both."""
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


def flower_dataloaders(items, pp: Preprocessing, bs: int = 32, valid_pct: float = 0.2, seed: int = 0,
                       num_workers: int = 0, device=None, groups=None, **kwargs):
    """fastai DataLoaders over `items`: (path, label) pairs, split here (`valid_pct`, `seed`, `groups`), or the
    `frame` of a `split_photos` split."""
    frame = items if isinstance(items, pd.DataFrame) else items_frame(items, groups)
    return flower_datablock(pp, valid_pct, seed, **kwargs).dataloaders(
        frame, bs=bs, num_workers=num_workers, device=device)
