"""Exporting a run (export.py, flowers_fastai/exporting.py): the exported file gives the learner's own logits
through `submit`, fp16 included; it is calibrated on the run's validation photos; the newest finished run of a family
is found; the file and its sidecar are written atomically (a reader keeps the old pair, a failure leaves it whole)
and never replaced by a pair `submit` would refuse; a half-written run folder is one sentence naming the file and
what to do, and does not block exporting the other runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from flowers_fastai.exporting import export_run, latest_run
from flowers_fastai.labels import CLASSES
from flowers_fastai.preprocess import load_for_model
from flowers_fastai.submit import load_cnn_model, predict
from flowers_fastai.training import train

from .helpers import TINY_CNN, copy_run, fastai_logits, real_photos, truncate_file


def test_export_then_submit_gives_the_learners_logits(tmp_path, monkeypatch):
    photos = [p for paths in real_photos(per_class=1).values() for p in paths]
    data = tmp_path / 'data'
    for p in photos + [q for paths in real_photos(per_class=6).values() for q in paths]:
        (data / p.parent.name).mkdir(parents=True, exist_ok=True)
        (data / p.parent.name / p.name).write_bytes(p.read_bytes())
    learn = train(TINY_CNN.override(size=48), data, tmp_path / 'run', pretrained=False)

    out = export_run(tmp_path / 'run', tmp_path / 'out' / 'cnn_flowers.pth')
    sidecar = json.loads(out.with_suffix('.json').read_text())
    assert sidecar['image_size'] == 48 and sidecar['arch'] == 'convnextv2_atto'
    state = torch.load(out, map_location='cpu', weights_only=True)
    import timm
    assert list(state) == list(timm.create_model('convnextv2_atto', num_classes=5).state_dict())

    model = load_cnn_model(out)
    expected = fastai_logits(learn, photos)
    for photo, want in zip(photos, expected):
        got = model(load_for_model(photo, model.flowers_preprocessing))[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert predict(model, photo) == CLASSES[int(want.argmax())]

    half = export_run(tmp_path / 'run', tmp_path / 'out' / 'half.pth', half=True)
    assert half.stat().st_size < 0.6 * out.stat().st_size
    model16 = load_cnn_model(half)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    torch.testing.assert_close(model16(load_for_model(photos[0], model16.flowers_preprocessing))[0],
                               expected[0], atol=2e-2, rtol=0)


def test_export_calibrates_on_the_runs_validation_photos(colour_folder, tmp_path, capsys):
    from flowers_fastai.calibration import fit_temperature
    run = tmp_path / 'run'
    learn = train(TINY_CNN.override(epochs=3), colour_folder, run, pretrained=False)
    listed = pd.read_csv(run / 'valid_items.csv')
    assert set(listed.path) == set(map(str, learn.dls.valid_ds.items.path)) and len(listed) == 15
    out = export_run(run, tmp_path / 'cnn_flowers.pth')
    sidecar = json.loads(out.with_suffix('.json').read_text())
    t, report = sidecar['temperature'], sidecar['calibration']
    assert report['n_valid'] == 15 and (run / 'reliability.png').stat().st_size > 0
    # the stored T is the NLL-optimal temperature of the learner's own validation logits
    logits, targets = learn.get_preds(ds_idx=1, act=lambda x: x)
    assert t == pytest.approx(fit_temperature(logits, targets), rel=1e-3)
    assert report['nll_after'] <= report['nll_before'] + 1e-9
    model = load_cnn_model(out)
    assert model.flowers_temperature == t
    plain = export_run(run, tmp_path / 'plain.pth', calibrated=False)
    assert 'temperature' not in json.loads(plain.with_suffix('.json').read_text())
    # without the photos (another machine), the export still works, uncalibrated, and says so
    listed.assign(path=[str(tmp_path / 'gone' / Path(p).name) for p in listed.path]).to_csv(
        run / 'valid_items.csv', index=False)
    elsewhere = export_run(run, tmp_path / 'elsewhere.pth')
    assert 'temperature' not in json.loads(elsewhere.with_suffix('.json').read_text())
    assert 'not calibrated' in capsys.readouterr().out


def test_latest_run_picks_the_newest_finished_run_of_a_family(colour_folder, tmp_path):
    runs = tmp_path / 'runs'
    train(TINY_CNN, colour_folder, runs / 'a', pretrained=False)
    train(TINY_CNN, colour_folder, runs / 'b', pretrained=False)
    assert latest_run(runs, 'cnn') == runs / 'b'
    assert latest_run(runs, 'vit') is None


# ------------------------------------------------------------------------------------------ written atomically
def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_export_replaces_the_files_and_a_reader_keeps_the_old_ones(cnn_run, tmp_path):
    out = tmp_path / 'weights' / 'cnn_flowers.pth'
    export_run(cnn_run, out, calibrated=False)
    sidecar = out.with_suffix('.json')
    inodes = out.stat().st_ino, sidecar.stat().st_ino
    old_bytes, old_sidecar = out.read_bytes(), sidecar.read_text()
    with out.open('rb') as served, sidecar.open() as served_sidecar:   # e.g. the demo has them open
        export_run(cnn_run, out, half=True, calibrated=False)
        assert served.read() == old_bytes and served_sidecar.read() == old_sidecar   # old content until closed
    assert (out.stat().st_ino, sidecar.stat().st_ino) != inodes
    assert out.stat().st_ino != inodes[0] and sidecar.stat().st_ino != inodes[1]   # replaced, not rewritten
    assert out.read_bytes() != old_bytes and json.loads(sidecar.read_text())['dtype'] == 'float16'
    assert _listing(out.parent) == {'cnn_flowers.pth', 'cnn_flowers.json'}           # no temporary file left
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())                 # a normal file mode


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize('failure', ['torch.save dies mid-write', 'calibration dies after the weights'])
def test_a_failed_export_leaves_the_old_pair_and_no_temporary_file(failure, cnn_run, tmp_path, monkeypatch):
    out = tmp_path / 'weights' / 'cnn_flowers.pth'
    export_run(cnn_run, out, calibrated=False)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    if failure == 'torch.save dies mid-write':
        def dies(obj, f, *args, **kwargs):
            Path(f).write_bytes(b'half a file')
            raise OSError(28, 'No space left on device')
        monkeypatch.setattr(torch, 'save', dies)
        with pytest.raises(OSError):
            export_run(cnn_run, out, calibrated=False)
    else:
        from flowers_fastai import exporting

        def dies(*args, **kwargs):
            raise RuntimeError('killed')
        monkeypatch.setattr(exporting, 'calibrate', dies)
        with pytest.raises(RuntimeError):
            export_run(cnn_run, out, half=True)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def _with_weights(run: Path, change) -> None:
    """Rewrite the run's best checkpoint with `change` applied to every floating-point tensor."""
    best = run / 'models' / 'best.pth'
    saved = torch.load(best, weights_only=True)
    state = saved.get('model', saved)
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = change(value)
    torch.save(saved, best)


EXPORT_REFUSED = {
    'weights of 3e38 (finite, but the logits overflow)': (lambda run: _with_weights(run, lambda v: v.clone().fill_(3e38)),
                                                          False),
    '--half of weights over fp16\'s range': (lambda run: _with_weights(run, lambda v: v * 0 + 1e5), True),
    'a config field out of range': (lambda run: (run / 'config.json').write_text(json.dumps(
        {**json.loads((run / 'config.json').read_text()),
         'preprocessing': {**json.loads((run / 'config.json').read_text())['preprocessing'], 'crop_pct': 5.0}})),
        False),
}


@pytest.mark.parametrize('case', list(EXPORT_REFUSED))
def test_export_never_replaces_a_file_with_one_submit_would_refuse(case, cnn_run, tmp_path):
    import export as export_cli
    damage, half = EXPORT_REFUSED[case]
    run = copy_run(cnn_run, tmp_path / 'run')
    out = tmp_path / 'weights' / 'cnn_flowers.pth'
    export_run(cnn_run, out, calibrated=False)
    before = {p.name: p.read_bytes() for p in (out, out.with_suffix('.json'))}
    damage(run)
    with pytest.raises(SystemExit) as info:
        export_cli.main(['--run', str(run), '--out', str(out), '--no-calibrate', *(['--half'] if half else [])])
    code = info.value.code
    assert isinstance(code, str) and code.startswith('error: ') and 'refused' in code and '\n' not in code, code
    assert {p.name: p.read_bytes() for p in (out, out.with_suffix('.json'))} == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(before)   # no temporary file left


# ------------------------------------------------------------------------------------------ half-written run folders
EXPORT_DAMAGE = {
    'truncated best.pth': ('models/best.pth', truncate_file),
    'missing best.pth': ('models/best.pth', Path.unlink),
    'broken config.json': ('config.json', lambda p: p.write_text('{"recipe": {"fam')),
    'config.json without preprocessing': ('config.json', lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != 'preprocessing'}))),
    'broken metrics.json': ('metrics.json', lambda p: p.write_text('{"valid_accuracy": 0.9')),
    'missing config.json': ('config.json', Path.unlink),
}


@pytest.mark.parametrize('damage', list(EXPORT_DAMAGE))
def test_export_of_a_half_written_run_says_which_file_and_what_to_do(damage, cnn_run, tmp_path, capsys):
    import export
    run = copy_run(cnn_run, tmp_path / 'run')
    name, harm = EXPORT_DAMAGE[damage]
    harm(run / name)
    out = tmp_path / 'cnn_flowers.pth'
    with pytest.raises(SystemExit) as info:
        export.main(['--run', str(run), '--out', str(out), '--no-calibrate'])
    message = info.value.code
    assert isinstance(message, str) and message.startswith('error: '), message   # exit status 1, no traceback
    assert '\n' not in message and (str(run / name) in message or str(run) in message), message
    assert 'train it again' in message or 'another run' in message
    assert not out.exists()


def test_a_seeds_experiment_with_a_broken_summary_says_so(cnn_run, tmp_path):
    exp = tmp_path / 'exp'
    copy_run(cnn_run, exp / 'seed0')
    (exp / 'summary.json').write_text('{"best_run": "seed')
    with pytest.raises(ValueError, match='summary.json'):
        export_run(exp, tmp_path / 'cnn.pth', calibrated=False)
    (exp / 'summary.json').write_text('{"best_run": "seed7"}')
    with pytest.raises(ValueError, match='seed7'):
        export_run(exp, tmp_path / 'cnn.pth', calibrated=False)


def test_export_without_run_skips_broken_latest_runs_and_exports_the_next(cnn_run, tmp_path, capsys):
    import export
    runs = tmp_path / 'runs'
    good, truncated, broken = (copy_run(cnn_run, runs / name) for name in ('a-good', 'b-truncated', 'c-broken'))
    truncate_file(truncated / 'models' / 'best.pth')
    (broken / 'config.json').write_text('{')
    for age, run in enumerate((broken, truncated, good)):   # the good run is the oldest
        os.utime(run / 'metrics.json', (1e9 - age * 1000, 1e9 - age * 1000))
    out = tmp_path / 'cnn_flowers.pth'
    assert export.main(['--runs', str(runs), '--family', 'cnn', '--out', str(out), '--no-calibrate']) == 0
    assert json.loads(out.with_suffix('.json').read_text())['run'] == 'a-good'
    err = capsys.readouterr().err
    assert f'skipped {truncated}' in err and f'skipped {broken}' in err and 'best.pth' in err
    assert err.count(f'skipped {broken}') == 1

    truncate_file(good / 'models' / 'best.pth')   # nothing left to export: an error, not a traceback
    with pytest.raises(SystemExit) as info:
        export.main(['--runs', str(runs), '--family', 'cnn', '--out', str(out), '--no-calibrate'])
    assert isinstance(info.value.code, str) and info.value.code.startswith('error: ')


def test_a_config_field_of_the_wrong_kind_is_one_sentence_and_only_delivered_families_export(tmp_path):
    from flowers_fastai.exporting import delivered_family
    from flowers_fastai.preprocess import cnn_preprocessing
    from flowers_fastai.recipes import TEACHER
    from flowers_fastai.run_config import RunConfig
    from flowers_fastai.run_folder import RunFolderError, read_run_config
    config = RunConfig(recipe=TINY_CNN, preprocessing=cnn_preprocessing(32), data=('photos',))
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    (tmp_path / 'config.json').write_text(json.dumps({**config.to_dict(), 'classes': 5}))
    with pytest.raises(RunFolderError, match='config.json: .*not iterable'):   # not a TypeError traceback
        read_run_config(tmp_path)
    assert delivered_family(config, tmp_path).delivery.weights_file == 'cnn_flowers.pth'
    with pytest.raises(RunFolderError, match='the teacher family is not delivered'):
        delivered_family(RunConfig(recipe=TEACHER, preprocessing=cnn_preprocessing(32)), tmp_path)
