"""Data audit: exact and near-duplicate photos, found by perceptual hash, and photos filed under two classes.

The shared flower folder (like every public copy of it) holds the same photo more than once: re-encoded,
resized, re-coloured, sometimes filed under two classes. A random split puts one copy in training and another in
validation, and validation accuracy then measures memory. Here duplicates form groups that a split keeps on one
side, and groups whose copies carry different labels are left out of training and validation altogether.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocess import decode_image

# Hamming distance between 64-bit pHashes at or below which two photos count as copies. Looked at on
# ../shared/data/flowers: pairs at <= 6 are the same photo (resized, re-coloured, lightly cropped); from 8 on,
# different photos of similar composition appear (even across classes), so 6 is the largest safe value.
MAX_DISTANCE = 6


def perceptual_hashes(paths: list[Path]) -> np.ndarray:
    """64-bit DCT perceptual hash (imagehash.phash) of each photo, as uint64."""
    import imagehash
    # decode_image, not open_image: truncated photos are reported by the folder scan already, and silencing its
    # warning with a filter would change process-wide state (not thread-safe)
    return np.array([int(str(imagehash.phash(decode_image(p, draft_min_side=64)[0])), 16) for p in paths],
                    dtype=np.uint64)


def flickr_id(path: Path) -> str | None:
    """The Flickr photo id that starts the file names of this data set ('7166539842_43b7e02883_n.jpg'), if any:
    two files with one id are one photo, even when cropped beyond what a perceptual hash recognises."""
    match = re.match(r'(\d{6,})_', Path(path).name)
    return match.group(1) if match else None


def duplicate_groups(hashes: np.ndarray, max_distance: int = MAX_DISTANCE, keys: list | None = None,
                     pairs: list[tuple[int, int]] = ()) -> np.ndarray:
    """A group id per photo: photos within `max_distance` bits of each other, with the same non-None key, or
    listed together in `pairs` (indices), transitively, share one."""
    parent = np.arange(len(hashes))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i in range(len(hashes) - 1):
        close = np.nonzero(np.bitwise_count(np.bitwise_xor(hashes[i], hashes[i + 1:])) <= max_distance)[0] + i + 1
        for j in close:
            parent[root(j)] = root(i)
    first_with_key = {}
    for i, key in enumerate(keys or []):
        if key is not None:
            parent[root(i)] = root(first_with_key.setdefault(key, i))
    for i, j in pairs:
        parent[root(j)] = root(i)
    roots = np.array([root(i) for i in range(len(hashes))])
    return np.unique(roots, return_inverse=True)[1]   # 0..n_groups-1


@dataclass
class Audit:
    """Groups of copies among `items` (path, label) and the groups filed under more than one class."""
    items: list[tuple[Path, str]]
    group: np.ndarray                 # group id per item

    def groups(self, min_size: int = 2) -> list[list[int]]:
        ids, counts = np.unique(self.group, return_counts=True)
        return [np.nonzero(self.group == g)[0].tolist() for g, n in zip(ids, counts) if n >= min_size]

    def conflicts(self) -> list[list[int]]:
        """Groups whose copies carry different labels."""
        return [g for g in self.groups() if len({self.items[i][1] for i in g}) > 1]

    def kept(self) -> list[int]:
        """Indices of the items usable for training and validation (not in a conflicting group)."""
        left_out = {i for g in self.conflicts() for i in g}
        return [i for i in range(len(self.items)) if i not in left_out]

    def report(self) -> str:
        groups, conflicts = self.groups(), self.conflicts()
        lines = [f'{len(self.items)} photos; {len(groups)} groups of copies (pHash distance <= {MAX_DISTANCE}, '
                 'one Flickr id, or listed beside the folder) '
                 f'holding {sum(map(len, groups))} photos; {len(conflicts)} groups filed under two classes, '
                 f'left out of training and validation ({sum(map(len, conflicts))} photos):']
        for g in conflicts:
            lines.append('  ' + '  |  '.join(f'{self.items[i][1]}: {self.items[i][0]}' for i in g))
        lines.append('Groups of copies within one class (kept together on one side of every split):')
        for g in groups:
            if g not in conflicts:
                lines.append('  ' + '  |  '.join(str(self.items[i][0]) for i in g))
        # a class that the left-out groups empty cannot be trained on (training stops and says so)
        kept = [self.items[i][1] for i in self.kept()]
        for label in sorted({label for _, label in self.items}):
            total = sum(1 for _, other in self.items if other == label)
            if kept.count(label) < 2 and kept.count(label) < total:
                lines.append(f'Warning: class {label!r} keeps {kept.count(label)} of its {total} photos; training needs '
                             'at least 2: remove each copy from the folder where it does not belong')
        return '\n'.join(lines)


def audit_items(items: list[tuple[Path, str]], max_distance: int = MAX_DISTANCE,
                hashes: np.ndarray | None = None) -> Audit:
    """The duplicate groups of `items`; `hashes`: their perceptual hashes, when computed already. Pairs that a
    folder's own list of near-duplicates names (`listed_near_duplicates`) are grouped too."""
    paths = [p for p, _ in items]
    hashes = perceptual_hashes(paths) if hashes is None else hashes
    return Audit(items, duplicate_groups(hashes, max_distance, keys=[flickr_id(p) for p in paths],
                                         pairs=listed_pairs(paths)))


def listed_near_duplicates(root: Path) -> list[tuple[Path, Path]]:
    """The near-duplicate pairs a data folder's provider lists beside it, `<folder>-near-duplicates.tsv` (columns
    a and b: paths relative to the folder), which a pHash misses when the list was made with another hash (the
    flowers-flickr folder's is an 8x8 difference hash); none where there is no such file."""
    import csv
    listing = Path(root).parent / f'{Path(root).name}-near-duplicates.tsv'
    if not listing.is_file():
        return []
    with listing.open(newline='') as f:
        return [(Path(root) / row['a'], Path(root) / row['b']) for row in csv.DictReader(f, delimiter='\t')
                if row.get('a') and row.get('b')]


def listed_pairs(paths: list[Path]) -> list[tuple[int, int]]:
    """Index pairs of `paths` that the lists of their folders name as near-duplicates."""
    where = {Path(p): i for i, p in enumerate(paths)}
    roots = {Path(p).parent.parent for p in paths}   # <root>/<class>/<photo>
    return [(where[a], where[b]) for root in roots for a, b in listed_near_duplicates(root)
            if a in where and b in where]
