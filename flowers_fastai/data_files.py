"""Folders of labelled photos, without fastai: what training's data scan and evaluation share, and the file
conventions of command-line prediction."""
from __future__ import annotations

from pathlib import Path

from .labels import CLASSES, normalize_class_name

IMAGE_EXTENSIONS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


def class_folders(root: Path, error: type[Exception] = ValueError) -> dict[str, list[Path]]:
    """The class folders of `root` by class, in `CLASSES` order (`Roses/` -> 'rose'; several folders may mean
    one class; hidden folders ignored). A missing `root`, or a folder that names no class, raises `error`."""
    if not root.is_dir():
        raise error(f'data folder {root} does not exist or is not a folder')
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
    unknown = [p.name for p in folders if normalize_class_name(p.name) is None]
    if unknown:
        raise error(f'{root}: folder(s) {unknown} name no class; expected one folder per class of {CLASSES} '
                    '(plural and capitalised names such as "Roses" are accepted)')
    by_class: dict[str, list[Path]] = {}
    for folder in folders:
        by_class.setdefault(normalize_class_name(folder.name), []).append(folder)
    return {c: by_class[c] for c in CLASSES if c in by_class}


def folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; hidden files and folders ignored."""
    images, others = [], []
    for path in sorted(folder.rglob('*')):
        if path.is_file() and not any(part.startswith('.') for part in path.relative_to(folder).parts):
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others
