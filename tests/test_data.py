"""The photo folder: scanning, class-name normalisation, problems reported before training (a file no decoder
reads, of any kind, listed and left out; other threads' warnings kept while the scan decodes), the stratified
split, several data folders."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from flowers_fastai.data import DatasetError, scan_image_folder, stratified_split
from flowers_fastai.labels import CLASSES, normalize_class_name

from .helpers import (DATA_DIR, PHOTOS, check_outcomes, decode_concurrently, dds_unknown_fourcc, noisy_jpeg,
                      truncated_copy)


def make_folder(root, names=('daisy', 'dandelion', 'Roses', 'sunflowers', 'TULIPS'), per_class=3, size=(24, 16)):
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / name / f'{i}.jpg')
    return root


def test_class_names_are_normalised():
    assert [normalize_class_name(n) for n in ['Roses', 'sunflowers', ' TULIPS', 'daisy', 'Dandelions']] == \
           ['rose', 'sunflower', 'tulip', 'daisy', 'dandelion']
    assert normalize_class_name('cats') is None


def test_scan_reads_tensorflow_layout_and_skips_non_images_with_one_warning(tmp_path):
    root = make_folder(tmp_path)
    (root / 'Roses' / 'LICENSE.txt').write_text('not a photo')
    (root / 'daisy' / 'notes.md').write_text('not a photo')
    with pytest.warns(UserWarning, match=r'skipped 2 file\(s\) that are not images') as record:
        scanned = scan_image_folder(root)
    assert len([w for w in record if 'not images' in str(w.message)]) == 1
    assert scanned.counts() == {c: 3 for c in CLASSES}
    assert {label for _, label in scanned.items} == set(CLASSES)
    assert all(path.suffix == '.jpg' for path, _ in scanned.items)


def test_unreadable_photos_are_reported_and_left_out_before_training(tmp_path):
    root = make_folder(tmp_path)
    (root / 'daisy' / 'broken.jpg').write_bytes(b'\xff\xd8 this is not a jpeg at all')
    (root / 'TULIPS' / 'empty.png').write_bytes(b'')
    with pytest.warns(UserWarning, match=r'left out 2 unreadable photo') as record:
        scanned = scan_image_folder(root)
    message = ' '.join(str(w.message) for w in record)
    assert 'broken.jpg' in message and 'empty.png' in message
    assert scanned.counts()['daisy'] == 3 and scanned.counts()['tulip'] == 3
    assert {p.name for p, _ in scanned.unreadable} == {'broken.jpg', 'empty.png'}


@pytest.mark.parametrize('problem, match', [
    ('missing_class', r"no folder for class\(es\) \['tulip'\]"),
    ('empty_class', r"class\(es\) \['rose'\] have no usable photo"),
    ('unknown_folder', r"folder\(s\) \['cats'\] name no class"),
    ('no_root', r'does not exist'),
])
def test_folder_problems_are_clear_errors(tmp_path, problem, match):
    root = tmp_path / 'data'
    if problem == 'missing_class':
        make_folder(root, names=('daisy', 'dandelion', 'rose', 'sunflower'))
    elif problem == 'empty_class':
        make_folder(root, names=('daisy', 'dandelion', 'sunflower', 'tulip'))
        (root / 'rose').mkdir()
    elif problem == 'unknown_folder':
        make_folder(root)
        (root / 'cats').mkdir()
    with pytest.raises(DatasetError, match=match):
        scan_image_folder(root)


def test_training_refuses_a_bad_folder_before_building_anything(tmp_path):
    from flowers_fastai.recipes import CNN
    from flowers_fastai.training import train
    root = make_folder(tmp_path / 'data', names=('daisy', 'dandelion', 'rose', 'sunflower'))
    with pytest.raises(DatasetError, match='tulip'):
        train(CNN.override(arch='convnextv2_atto', size=32), root, tmp_path / 'run', pretrained=False)
    assert not (tmp_path / 'run' / 'models').exists()


def test_stratified_split_is_stratified_seeded_and_a_partition():
    labels = ['daisy'] * 50 + ['dandelion'] * 70 + ['rose'] * 30 + ['sunflower'] * 45 + ['tulip'] * 55
    train, valid = stratified_split(labels, valid_pct=0.2, seed=0)
    assert sorted(train + valid) == list(range(len(labels))) and not set(train) & set(valid)
    counts = Counter(labels[i] for i in valid)
    for c, n in Counter(labels).items():
        assert abs(counts[c] - 0.2 * n) <= 1, (c, counts[c], n)
    assert stratified_split(labels, 0.2, seed=0) == (train, valid)
    assert stratified_split(labels, 0.2, seed=1)[1] != valid


def test_real_data_folder_scans_to_the_published_counts():
    if not DATA_DIR.is_dir():
        pytest.skip(f'{DATA_DIR} is absent')
    scanned = scan_image_folder(DATA_DIR)
    assert scanned.counts() == {'daisy': 688, 'dandelion': 947, 'rose': 706, 'sunflower': 660, 'tulip': 886}
    assert not scanned.unreadable


def test_a_split_too_small_for_every_class_on_both_sides_is_a_clear_error():
    labels = [c for c in CLASSES for _ in range(3)]
    with pytest.raises(DatasetError, match='too few for a stratified 20% validation split'):
        stratified_split(labels, valid_pct=0.2)
    train, valid = stratified_split(labels, valid_pct=0.4)
    assert {labels[i] for i in valid} == {labels[i] for i in train} == set(CLASSES)


def test_one_scanner_strict_for_training_and_evaluation_lenient_for_prediction(tmp_path):
    """data_files.scan_folder on a folder with odd entries. strict: class folders only, hidden entries and files
    at the top skipped, non-images listed apart, an unknown class folder refused. lenient: every image file
    under the folder, hidden ones included, exactly the pathlib rglob listing the prediction CLI used before."""
    from flowers_fastai.data_files import IMAGE_EXTENSIONS, scan_folder
    from flowers_fastai.predict import expand
    root = make_folder(tmp_path / 'data', names=('Roses', 'tulip'), per_class=1)
    (root / 'Roses' / 'deeper').mkdir()
    (root / 'Roses' / 'deeper' / 'UPPER.JPG').write_bytes(b'x')
    (root / 'Roses' / '.hidden.jpg').write_bytes(b'x')
    (root / 'Roses' / '.cache').mkdir()
    (root / 'Roses' / '.cache' / 'thumb.png').write_bytes(b'x')
    (root / 'tulip' / 'notes.txt').write_text('not a photo')
    (root / 'top.jpg').write_bytes(b'x')
    (root / 'tulip' / 'linked').symlink_to(root / 'Roses', target_is_directory=True)   # not followed

    strict = scan_folder(root)
    assert strict.items == [(root / 'Roses' / '0.jpg', 'rose'), (root / 'Roses' / 'deeper' / 'UPPER.JPG', 'rose'),
                            (root / 'tulip' / '0.jpg', 'tulip')]
    assert strict.non_images == [root / 'tulip' / 'notes.txt'] and strict.unreadable == []
    assert strict.folders == {'rose': [root / 'Roses'], 'tulip': [root / 'tulip']}

    lenient = scan_folder(root, strict=False)
    rglob = sorted(p for p in root.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    assert [p for p, _ in lenient.items] == rglob == expand([root])
    assert {p.name for p in rglob} == {'0.jpg', 'UPPER.JPG', '.hidden.jpg', 'thumb.png', 'top.jpg'}
    assert all(label is None for _, label in lenient.items)

    (root / 'cats').mkdir()
    with pytest.raises(DatasetError, match=r"\['cats'\] name no class"):
        scan_folder(root, error=DatasetError)
    assert len(scan_folder(root, strict=False).items) == len(rglob)   # lenient: any folder name


# ------------------------------------------------------------------------------------------- several data folders
def _textured_folder(root, seed, per_class=8, size=(40, 32)):
    """Photos distinct enough that no two are copies by pHash (random noise per photo)."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f'{seed}_{i}.png')
    return root


def _valid_paths(photos, source=None):
    frame = photos.frame
    if source is not None:
        frame = frame[frame.source == source]
    return set(frame.loc[frame.is_valid, 'path'])


@pytest.mark.parametrize('split', ['stratified', 'grouped'])
def test_the_first_folder_keeps_its_own_split_when_a_second_is_added(tmp_path, split):
    from flowers_fastai.data import split_photos
    first, second = _textured_folder(tmp_path / 'a', 0), _textured_folder(tmp_path / 'b', 1)
    for seed in (0, 3):
        alone = split_photos(first, split, 0.25, seed)
        both = split_photos([first, second], split, 0.25, seed)
        assert _valid_paths(both, source=0) == _valid_paths(alone)
        assert set(both.frame.source) == {0, 1} and both.names == ['a', 'b']
        for k in (0, 1):   # each folder stratified on its own: 2 of 8 photos per class in validation
            side = both.frame[(both.frame.source == k) & both.frame.is_valid]
            assert Counter(side.label) == {c: 2 for c in CLASSES}
        # the same indices as rebuild_split's: items folder by folder
        assert {both.items[i][0] for i in both.valid_idx} == _valid_paths(both)
    assert _valid_paths(split_photos([first, second], split, 0.25, 0)) != \
        _valid_paths(split_photos([first, second], split, 0.25, 3))


def test_a_copy_in_a_later_folder_goes_to_its_copys_side_and_a_cross_class_copy_is_left_out(tmp_path):
    import shutil
    from flowers_fastai.data import split_photos
    first, second = _textured_folder(tmp_path / 'a', 0), _textured_folder(tmp_path / 'b', 1)
    alone = split_photos(first, 'grouped', 0.25, 0)
    valid_rose = sorted(p for p in _valid_paths(alone) if p.parent.name == 'rose')[0]
    train_rose = sorted(p for p in set(alone.frame.path) - _valid_paths(alone) if p.parent.name == 'rose')[0]
    shutil.copy(valid_rose, second / 'rose' / 'copy_of_valid.png')     # same class: follows its copy
    shutil.copy(train_rose, second / 'rose' / 'copy_of_train.png')
    valid_daisy = sorted(p for p in _valid_paths(alone) if p.parent.name == 'daisy')[0]
    shutil.copy(valid_daisy, second / 'tulip' / 'copy_filed_as_tulip.png')   # another class: left out
    both = split_photos([first, second], 'grouped', 0.25, 0)
    valid = _valid_paths(both)
    assert second / 'rose' / 'copy_of_valid.png' in valid
    assert second / 'rose' / 'copy_of_train.png' in set(both.frame.path) - valid
    assert second / 'tulip' / 'copy_filed_as_tulip.png' not in set(both.frame.path)
    assert _valid_paths(both, source=0) == _valid_paths(alone)   # the first folder's photos never move
    # a stratified split splits photos independently: the cross-class copy stays
    assert second / 'tulip' / 'copy_filed_as_tulip.png' in set(split_photos([first, second], 'stratified').frame.path)


def test_near_duplicates_listed_beside_a_folder_stay_on_one_side(tmp_path):
    from flowers_fastai.data import split_photos
    folder = _textured_folder(tmp_path / 'b', 1)
    pairs = [(f'{c}/1_{i}.png', f'{c}/1_{i + 1}.png') for c in CLASSES for i in (0, 2, 4)]
    (tmp_path / 'b-near-duplicates.tsv').write_text('a\tb\thamming\n' + ''.join(f'{a}\t{b}\t4\n' for a, b in pairs))
    for seed in range(4):
        photos = split_photos(folder, 'grouped', 0.25, seed)
        valid = {p.relative_to(folder).as_posix() for p in _valid_paths(photos)}
        assert all((a in valid) == (b in valid) for a, b in pairs)
        assert photos.audit.report().startswith('40 photos; 15 groups of copies')
    (tmp_path / 'b-near-duplicates.tsv').unlink()
    assert split_photos(folder, 'grouped', 0.25, 0).audit.groups() == []


def test_data_folders_reads_one_path_several_and_what_config_json_recorded():
    from pathlib import Path
    from flowers_fastai.data import data_folders, folder_names
    assert data_folders('x/flowers') == [Path('x/flowers')]
    assert data_folders(['x/flowers', Path('y/flickr')]) == [Path('x/flowers'), Path('y/flickr')]
    assert folder_names([Path('a/flowers'), Path('b/flowers'), Path('c/flickr')]) == ['flowers0', 'flowers1', 'flickr']
    with pytest.raises(DatasetError, match='no data folder'):
        data_folders([])


def test_real_folders_split_together_give_the_first_its_split_alone():
    """The shipped file's 778 validation photos (stratified, seed 0) stay the first folder's validation photos
    when the flickr folder joins: old and new students are compared on the same photos."""
    from flowers_fastai.data import split_photos
    flickr = DATA_DIR.parent / 'flowers-flickr'
    if not flickr.is_dir():
        pytest.skip(f'{flickr} is absent')
    items = scan_image_folder(DATA_DIR).items
    _, valid = stratified_split([label for _, label in items], 0.2, 0)
    alone = {items[i][0] for i in valid}
    both = split_photos([DATA_DIR, flickr], 'stratified', 0.2, 0)
    assert len(alone) == 778 and _valid_paths(both, source=0) == alone
    assert len(_valid_paths(both, source=1)) == 606


# ------------------------------------------------------------------------------------------- undecodable files
def _deeper_than_path_max(top: Path) -> Path:
    """Folders 20 deep of 250-character names under `top`, a photo at the bottom: made through directory file
    descriptors, since no path reaches there. Returns the first folder whose path is over PATH_MAX (4096)."""
    fd, path, first_too_long = os.open(top, os.O_RDONLY), top, None
    try:
        for i in range(20):
            name = chr(ord('a') + i) * 250
            os.mkdir(name, dir_fd=fd)
            fd, old = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
            path = path / name
            if first_too_long is None and len(os.fsencode(path)) >= 4096:
                first_too_long = path
        with open(os.open('deep.jpg', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), 'wb') as f:
            f.write(PHOTOS[0].read_bytes())
    finally:
        os.close(fd)
    return first_too_long


def noisy_class_folders(root: Path, per_class: int) -> Path:
    """`per_class` decodable noisy JPEGs in a folder per class, each with its own seed."""
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            noisy_jpeg(root / c / f'{c}{i}.jpg', seed=10 * k + i)
    return root


def test_the_training_scan_lists_each_undecodable_file_and_keeps_the_others(tmp_path, hostile_format):
    pytest.importorskip('fastai')
    from flowers_fastai.data import scan_image_folder
    root = noisy_class_folders(tmp_path / 'data', per_class=2)
    dds = dds_unknown_fourcc(root / 'rose' / 'texture.jpg')
    crafted = hostile_format(root / 'tulip' / 'crafted.png', RuntimeError('decoder crashed'))
    memory = hostile_format(root / 'daisy' / 'memory.png', MemoryError())
    too_deep = _deeper_than_path_max(root / 'sunflower')
    with pytest.warns(UserWarning, match='left out 4 unreadable photo'):
        scanned = scan_image_folder(root)
    assert {p for p, _ in scanned.unreadable} == {dds, crafted, memory, too_deep}
    assert all(str(p) in why for p, why in scanned.unreadable)
    assert len(scanned.items) == 2 * len(CLASSES) and scanned.counts() == {c: 2 for c in CLASSES}


def test_the_training_scan_loses_no_other_threads_truncation_warning(tmp_path, tiny_pixel_limit,
                                                                   fast_thread_switches):
    """The scan must not decode under warnings.catch_warnings + 'ignore': the filters are process-wide, so while it
    scanned, other threads' TruncatedImageWarnings would vanish (and the filters could be left changed)."""
    pytest.importorskip('fastai')
    from flowers_fastai.data import scan_image_folder
    root = noisy_class_folders(tmp_path / 'data', per_class=3)
    truncated_copy(noisy_jpeg(tmp_path / 'src.jpg', seed=99), root / 'rose' / 'truncated.jpg')
    truncated = [truncated_copy(noisy_jpeg(tmp_path / f'src{i}.jpg', seed=i), tmp_path / f'truncated{i}.jpg')
                 for i in range(3)]
    jobs = ([('truncated', p) for p in truncated] + [('bomb', p) for p in tiny_pixel_limit]) * 60
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter('always')
        filters_before = list(warnings.filters)
        scans = []
        results = decode_concurrently(jobs, n_threads=4, extra=lambda: scans.append(scan_image_folder(root)))
        filters_after = list(warnings.filters)
    assert scans and all(len(s.items) == 16 and not s.unreadable for s in scans)   # the truncated one is kept
    assert filters_after == filters_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    check_outcomes(results, recorded)
