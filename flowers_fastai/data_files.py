"""Folders of photos, without fastai: the one folder scanner that training, evaluation and command-line
prediction share (`scan_folder`, strict or lenient), and the file conventions it follows."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .labels import CLASSES, normalize_class_name

IMAGE_EXTENSIONS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


@dataclass
class FolderScan:
    """What `scan_folder` found: image files with their class (None in a lenient scan), the files it skipped as
    not images, the sub-folders it could not list as (folder, why), and, strict, the class folders by class."""
    items: list[tuple[Path, str | None]] = field(default_factory=list)
    non_images: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    folders: dict[str, list[Path]] = field(default_factory=dict)


def scan_folder(root: str | os.PathLike, strict: bool = True, error: type[Exception] = ValueError) -> FolderScan:
    """The image files under `root`, recursively, sorted.

    strict (training, evaluation): `root/<class>/**/<file>`, labelled by their class folder (`class_folders`:
    a missing root or a folder that names no class raises `error`); hidden files and folders and files directly in
    `root` ignored; files without an image extension listed in `non_images`; a sub-folder that cannot be listed
    recorded in `unreadable`, not fatal. The caller decides what a missing class or an empty scan means.
    lenient (`python -m flowers_fastai.predict DIR`): every file under `root` with an image extension, hidden
    ones too, unlabelled; see `folder_files`."""
    root, scan = Path(root), FolderScan()
    if not strict:
        images, scan.non_images = folder_files(root, strict=False)
        scan.items = [(path, None) for path in images]
        return scan
    scan.folders = class_folders(root, error)
    for label, folders in scan.folders.items():
        for folder in folders:
            images, others = folder_files(folder, scan.unreadable)
            scan.items += [(path, label) for path in images]
            scan.non_images += others
    return scan


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


def folder_files(folder: Path, unreadable: list[tuple[Path, str]] | None = None,
                 strict: bool = True) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; symbolic links to folders not followed.

    strict: hidden files and folders ignored. A sub-folder that cannot be listed (a path longer than the system
    allows, no permission) is skipped, not fatal; with `unreadable` given it is appended there as (folder, why).
    A file whose path is too long to stat counts by its extension, so that opening it reports it.
    lenient: what the prediction CLI always did (pathlib's `rglob('*')` on Python 3.11): hidden files and
    folders included, a folder without permission skipped silently, any other error listing a folder or
    checking a file raised."""
    images, others = [], []

    def cannot_list(err: OSError) -> None:
        if not strict:
            if isinstance(err, PermissionError):
                return
            raise err
        if unreadable is not None:
            where = Path(err.filename or folder)
            unreadable.append((where, f'{where} is a folder that cannot be listed: {err.strerror or err}'))
    # os.walk, not rglob: rglob ends the whole scan at the first folder it cannot list
    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list):
        if strict:
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                is_file = path.is_file()
            except OSError:   # ENAMETOOLONG: listed here, but only its own open can say why it is unusable
                if not strict:
                    raise
                is_file = True
            if is_file and not (strict and name.startswith('.')):
                (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return sorted(images), sorted(others)


def folder_of(path: str | Path, folders: list[Path]) -> int:
    """The index of the data folder `path` lies in (resolved, so links and relative paths compare); ValueError when
    it lies in none."""
    resolved = Path(path).resolve()
    for k, folder in enumerate(folders):
        if resolved.is_relative_to(Path(folder).resolve()):
            return k
    raise ValueError(f'{path} lies in none of the data folders {", ".join(map(str, folders))}')


def folder_names(folders: list[Path]) -> list[str]:
    """A short, unique name per data folder (its own name, numbered when two share one): the per-folder columns of
    history.csv and metrics.json."""
    names = [Path(f).name or str(f) for f in folders]
    return [name if names.count(name) == 1 else f'{name}{k}' for k, name in enumerate(names)]
