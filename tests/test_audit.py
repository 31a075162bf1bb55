"""The data audit: copies of a photo grouped, kept on one side of the split; photos filed under two classes left out,
and the report warns of a class the audit empties."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from flowers_fastai.audit import MAX_DISTANCE, audit_items, duplicate_groups, flickr_id
from flowers_fastai.data import grouped_stratified_split
from flowers_fastai.labels import CLASSES

from .helpers import COLOURS, DATA_DIR, colour_data_folder


def test_groups_are_transitive_and_stop_at_the_distance_threshold():
    base = np.uint64(0)
    near = np.uint64((1 << MAX_DISTANCE) - 1)                  # MAX_DISTANCE bits from base
    nearer = near | np.uint64(1 << 40)                         # 1 bit from `near`, MAX_DISTANCE + 1 from base
    far = np.uint64((1 << (MAX_DISTANCE + 1)) - 1) << np.uint64(20)  # MAX_DISTANCE + 1 bits from base
    groups = duplicate_groups(np.array([base, near, nearer, far], dtype=np.uint64))
    assert groups[0] == groups[1] == groups[2]                 # base~near~nearer, transitively
    assert groups[3] != groups[0]
    assert len(set(duplicate_groups(np.array([base, far], dtype=np.uint64)))) == 2


def test_one_flickr_id_is_one_photo_whatever_the_hash():
    assert flickr_id('7166539842_43b7e02883_n.jpg') == flickr_id('tulip/7166539842_43b7e02883.jpg') == '7166539842'
    assert flickr_id('image_01.jpg') is None
    hashes = np.array([0, (1 << 64) - 1, 0xFFFF], dtype=np.uint64)   # all far apart
    groups = duplicate_groups(hashes, keys=['7166539842', '7166539842', None])
    assert groups[0] == groups[1] != groups[2]


def photo(seed, size=(96, 64)):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)   # blocky: a pHash survives resizing
    return Image.fromarray(small).resize(size, Image.NEAREST)


def test_audit_finds_resized_copies_and_leaves_out_cross_class_ones(tmp_path):
    items = []
    for i, (name, label) in enumerate([('a.jpg', 'daisy'), ('b.jpg', 'rose'), ('c.jpg', 'tulip')]):
        (tmp_path / label).mkdir(exist_ok=True)
        photo(i).save(tmp_path / label / name)
        items.append((tmp_path / label / name, label))
    photo(0).resize((192, 128)).save(tmp_path / 'daisy' / 'a_large.jpg')        # same photo, other size
    photo(1).save(tmp_path / 'tulip' / 'b_copy.jpg')                             # same photo, other class
    items += [(tmp_path / 'daisy' / 'a_large.jpg', 'daisy'), (tmp_path / 'tulip' / 'b_copy.jpg', 'tulip')]
    audit = audit_items(items)
    assert sorted(map(sorted, audit.groups())) == [[0, 3], [1, 4]]
    assert audit.conflicts() == [[1, 4]]
    assert audit.kept() == [0, 2, 3]
    report = audit.report()
    assert 'rose: ' in report and 'b_copy.jpg' in report and '1 groups filed under two classes' in report


def test_grouped_split_keeps_every_group_on_one_side_and_stays_stratified():
    rng = np.random.default_rng(0)
    labels = [c for c in CLASSES for _ in range(60)]
    groups = np.arange(len(labels))
    for start in range(0, len(labels), 10):          # a third of the photos come in groups of 3 copies
        groups[start + 1:start + 3] = groups[start]
    order = rng.permutation(len(labels))             # photos in random order, each group within one class
    labels, groups = [labels[i] for i in order], groups[order]
    train, valid = grouped_stratified_split(labels, groups, valid_pct=0.2, seed=0)
    assert sorted(train + valid) == list(range(len(labels)))
    assert not {groups[i] for i in train} & {groups[i] for i in valid}
    for c in CLASSES:
        share = sum(labels[i] == c for i in valid) / len(valid)
        assert abs(share - 0.2) < 0.06
    assert abs(len(valid) / len(labels) - 0.2) < 0.03
    assert grouped_stratified_split(labels, groups, 0.2, seed=0) == (train, valid)
    assert grouped_stratified_split(labels, groups, 0.2, seed=1)[1] != valid


def test_training_on_the_grouped_split_leaves_out_cross_class_copies(tmp_path):
    from flowers_fastai.recipes import CNN
    from flowers_fastai.training import train
    data = tmp_path / 'data'
    for k, c in enumerate(CLASSES):
        (data / c).mkdir(parents=True)
        for i in range(8):
            photo(100 * k + i, size=(48, 32)).save(data / c / f'{i}.jpg')
    photo(0, size=(48, 32)).save(data / 'rose' / 'daisy0_copy.jpg')   # daisy/0.jpg filed under rose too
    recipe = CNN.override(arch='convnextv2_atto', size=32, bs=8, epochs=1, valid_pct=0.25)
    train(recipe, data, tmp_path / 'run', pretrained=False)
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['split'] == 'grouped' and config['left_out_filed_under_two_classes'] == 2
    assert config['n_train'] + config['n_valid'] == 41 - 2


def test_real_folder_audit_finds_the_photos_filed_as_rose_and_tulip():
    if not DATA_DIR.is_dir():
        pytest.skip(f'{DATA_DIR} is absent')
    from flowers_fastai.data import scan_image_folder
    audit = audit_items(scan_image_folder(DATA_DIR, check_decodable=False).items)
    conflicts = [{(audit.items[i][1], audit.items[i][0].name) for i in g} for g in audit.conflicts()]
    assert {'15922772266_1167a06620.jpg', '17104364030_ee31ee279b_n.jpg', '17291451621_0e39f08b9e_n.jpg',
            '17291930305_79deae6a90_n.jpg'} <= {name for g in conflicts for _, name in g}
    assert all({label for label, _ in g} == {'rose', 'tulip'} for g in conflicts)
    assert len(audit.groups()) >= 25


def test_train_py_audit_reads_several_folders_and_finds_copies_across_them(tmp_path):
    import subprocess
    import sys
    from .helpers import REPO
    a, b = tmp_path / 'a', tmp_path / 'b'
    for k, c in enumerate(CLASSES):
        for root, offset in ((a, 0), (b, 50)):
            (root / c).mkdir(parents=True)
            for i in range(3):
                photo(100 * k + offset + i, size=(48, 32)).save(root / c / f'{i}.jpg')
    photo(0, size=(48, 32)).save(b / 'rose' / 'copy_of_a_daisy.jpg')   # a/daisy/0.jpg filed under rose in b
    out = subprocess.run([sys.executable, 'train.py', 'audit', '--data', str(a), str(b)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('31 photos; 1 groups of copies')
    assert f'daisy: {a / "daisy" / "0.jpg"}  |  rose: {b / "rose" / "copy_of_a_daisy.jpg"}' in out.stdout


def test_the_audit_report_warns_of_a_class_it_empties(tmp_path):
    from flowers_fastai.audit import audit_items
    from flowers_fastai.data import scan_image_folder
    data = colour_data_folder(tmp_path / 'data', {c: 3 for c in COLOURS})
    for photo in (data / 'rose').glob('*.jpg'):
        shutil.copy(photo, data / 'tulip' / photo.name.replace('_x', '_copy'))
    report = audit_items(scan_image_folder(data).items).report()
    assert "class 'rose' keeps 0 of its 3 photos" in report
    assert report.count('Warning:') == 1   # tulip keeps its own 3 photos
