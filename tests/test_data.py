"""The photo folder: scanning, class-name normalisation, problems reported before training, the stratified split."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from flowers_fastai.data import DatasetError, scan_image_folder, stratified_split
from flowers_fastai.labels import CLASSES, normalize_class_name

from .conftest import DATA_DIR


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
