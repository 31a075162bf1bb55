"""Folders of labelled photos, without fastai: what training's data scan and evaluation share, and the file
conventions of command-line prediction."""
from __future__ import annotations

import os
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


def folder_files(folder: Path, unreadable: list[tuple[Path, str]] | None = None) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; hidden files and folders ignored.

    A sub-folder that cannot be listed (a path longer than the system allows, no permission) is skipped, not
    fatal; with `unreadable` given it is appended there as (folder, why). A file whose path is too long to
    stat counts by its extension, so that opening it reports it."""
    images, others = [], []

    def cannot_list(err: OSError) -> None:
        if unreadable is not None:
            where = Path(err.filename or folder)
            unreadable.append((where, f'{where} is a folder that cannot be listed: {err.strerror or err}'))
    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list):   # rglob raised on the first
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]             # error: the scan ended there
        for name in filenames:
            path = Path(dirpath) / name
            try:
                is_file = path.is_file()
            except OSError:   # ENAMETOOLONG: listed here, but only its own open can say why it is unusable
                is_file = True
            if is_file and not name.startswith('.'):
                (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return sorted(images), sorted(others)
