"""Issue 12, training side: hostile or half-written files and data that cannot train.

- a crafted pickle is refused wherever a file is read (run checkpoints on export and --resume, the EMA state,
  pretrained files, submit's loaders), and no code in it runs; nothing in the project unpickles unsafely;
- export.py writes atomically (temporary file + rename): a reader keeps the old file, a failure leaves it whole;
- data that cannot train (a class emptied by the audit, a class on one side of the split, fewer photos than one
  batch) stops before training with one sentence, and metrics.json is always strict JSON;
- a half-written run folder gives one sentence naming the file and what to do, and does not block exporting
  the other runs.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowers_fastai.exporting import export_run
from flowers_fastai.recipes import VIT
from flowers_fastai.training import train

from .conftest import COLOURS, REPO, resume_point, set_resume_position
from .test_training import PLAIN, TINY_CNN

TINY_EMA = TINY_CNN.override(ema_decay=0.9)   # models/last.pth holds the weight average too


class RunsCode:
    """Unpickling this runs code: it writes `marker` (what a crafted weights file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f'open({str(self.marker)!r}, "w").write("code ran")',))


def crafted(path: Path, marker: Path, payload: dict | None = None) -> Path:
    """A torch file holding `payload` (real tensors) and a pickle that runs code when loaded unsafely."""
    torch.save({**(payload or {}), 'evil': RunsCode(marker)}, path)
    return path


def strict_json(path: Path):
    """JSON as the standard has it: NaN / Infinity are not JSON (Python's json accepts them by default)."""
    def refuse(name):
        raise ValueError(f'{path}: {name} is not JSON')
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope='module')
def cnn_run(colour_folder, tmp_path_factory) -> Path:
    """One finished tiny CNN run (1 epoch, EMA on): every file a run folder holds. Tests copy it."""
    run = tmp_path_factory.mktemp('runs') / 'cnn-a'
    train(TINY_EMA, colour_folder, run, pretrained=False)
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def as_interrupted_after_epoch_0(run: Path) -> None:
    """The run folder as a 2-epoch run looks after its first epoch: resume loads models/last.pth and goes on."""
    set_resume_position(run, phase=0, epoch=0)
    (run / 'metrics.json').unlink()


def test_the_crafted_payload_is_real(tmp_path):
    """The files below are dangerous for real: an unsafe load runs their code."""
    marker = tmp_path / 'marker'
    crafted(tmp_path / 'evil.pth', marker, {'w': torch.ones(1)})
    torch.load(tmp_path / 'evil.pth', weights_only=False)
    assert marker.read_text() == 'code ran'


# ============================================================================ 1. nothing unpickles code
@pytest.mark.parametrize('target', ['models/best.pth', 'models/last.pth'])
def test_crafted_checkpoint_in_a_run_folder_is_refused_and_never_runs(target, cnn_run, colour_folder, tmp_path):
    run = copy_run(cnn_run, tmp_path / 'run')
    if target != 'models/best.pth':
        as_interrupted_after_epoch_0(run)   # before crafting: the position lives in last.pth itself
    marker = tmp_path / 'marker'
    genuine = torch.load(run / target, map_location='cpu', weights_only=False)   # the test's own file
    crafted(run / target, marker, genuine if isinstance(genuine, dict) else {})
    with pytest.raises(ValueError) as err:
        if target == 'models/best.pth':
            export_run(run, tmp_path / 'cnn.pth', calibrated=False)
        else:   # --resume: last.pth (weights, optimizer, EMA, position) is loaded at once
            train(TINY_EMA.override(epochs=2), colour_folder, run, pretrained=False, resume=True)
    assert not marker.exists(), 'code in the checkpoint ran'
    assert str(run / target) in str(err.value) and 'refused' in str(err.value)
    assert not (tmp_path / 'cnn.pth').exists()


def test_resume_of_a_vit_lora_run_never_unpickles_a_crafted_last_pth(colour_folder, tmp_path, tiny_clip_name):
    """The issue's case: `--resume` of a ViT LoRA run read models/last.pth with weights_only=False."""
    import open_clip
    torch.manual_seed(0)
    stand_in = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(open_clip.create_model(tiny_clip_name, pretrained=None).state_dict(), stand_in)
    recipe = VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, freeze_epochs=1, unfreeze_blocks=0,
                          lora_rank=2, valid_pct=0.25, **PLAIN)
    run = tmp_path / 'run'
    train(recipe, colour_folder, run, pretrained=stand_in)
    marker = tmp_path / 'marker'
    last = run / 'models' / 'last.pth'
    genuine = torch.load(last, map_location='cpu', weights_only=False)
    genuine.update(phase=1, epoch=0, best=None)   # as if interrupted inside the last phase
    crafted(last, marker, genuine)
    with pytest.raises(ValueError, match='refused'):
        train(recipe, colour_folder, run, pretrained=stand_in, resume=True)
    assert not marker.exists(), 'code in last.pth ran on --resume'


def test_every_torch_load_in_training_resume_and_export_is_weights_only(colour_folder, tmp_path, monkeypatch):
    """Also fastai's internals: SaveModelCallback reloads the best weights with weights_only=False after a fit."""
    calls, original = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch, 'load', spy)
    run = tmp_path / 'run'
    train(TINY_CNN, colour_folder, run, pretrained=False)
    as_interrupted_after_epoch_0(run)
    train(TINY_CNN.override(epochs=2), colour_folder, run, pretrained=False, resume=True)
    export_run(run, tmp_path / 'cnn.pth', calibrated=False)
    assert calls and all(w is True for w in calls), calls


PRETRAINED_CONTAINERS = ['torch_zip', 'plain_pickle', 'torchscript_archive']


@pytest.mark.parametrize('container', PRETRAINED_CONTAINERS)
def test_crafted_pretrained_file_is_refused_and_never_runs(container, tmp_path):
    from flowers_fastai.models import create_model
    from flowers_fastai.recipes import RECIPES
    marker = tmp_path / 'marker'
    path = tmp_path / 'convnextv2_atto.pt'
    if container == 'torch_zip':
        crafted(path, marker, {'stem.0.weight': torch.ones(1)})
    elif container == 'plain_pickle':
        path.write_bytes(pickle.dumps({'evil': RunsCode(marker)}))
    else:   # looks like OpenAI's TorchScript CLIP files (a zip with constants.pkl), its data.pkl runs code
        with zipfile.ZipFile(path, 'w') as z:
            for name in ('data.pkl', 'constants.pkl'):
                z.writestr(f'archive/{name}', pickle.dumps(RunsCode(marker), protocol=2))
            z.writestr('archive/version', '3\n')
    with pytest.raises(ValueError) as err:
        create_model(RECIPES['cnn'].override(arch='convnextv2_atto'), pretrained=path)
    assert not marker.exists(), 'code in the pretrained file ran'
    assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_torchscript_pretrained_file_is_read_without_torch_jit_load(tmp_path, monkeypatch):
    """torch.jit.load would run the archive's TorchScript code (its __setstate__ methods): the tensors are read
    from the archive instead, the same ones jit.load gives."""
    from flowers_fastai.pretrained import read_checkpoint
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(2), torch.nn.Linear(2, 5)).half()
    path = tmp_path / 'ViT-Test.pt'
    torch.jit.save(torch.jit.script(model), str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError('torch.jit.load runs code in the archive')
    monkeypatch.setattr(torch.jit, 'load', forbidden)
    state = read_checkpoint(path)
    assert sorted(state) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value)


def test_submit_loaders_refuse_a_crafted_weights_file(tmp_path, tiny_cnn_file):
    from flowers_fastai.submit import load_cnn_model
    marker = tmp_path / 'marker'
    path = crafted(tmp_path / 'cnn_flowers.pth', marker, torch.load(tiny_cnn_file, weights_only=True))
    shutil.copy(tiny_cnn_file.with_suffix('.json'), path.with_suffix('.json'))
    with pytest.raises(ValueError):
        load_cnn_model(path)
    assert not marker.exists()


SOURCE_DIRS = ['flowers_fastai', 'scripts', 'benchmarks', 'examples']


def _project_sources() -> list[Path]:
    files = sorted(REPO.glob('*.py'))
    for folder in SOURCE_DIRS:
        files += sorted((REPO / folder).rglob('*.py'))
    return files


def _unsafe_loads(path: Path) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, any weights_only=False,
    torch.jit.load, pickle / dill / joblib / cloudpickle load(s), np.load(allow_pickle=True), fastai load_learner."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        where = f'{shown}:{node.lineno}: {ast.unparse(node)[:80]}'
        weights_only = keywords.get('weights_only')
        if isinstance(weights_only, ast.Constant) and weights_only.value is False:
            found.append(where)
        elif name == 'torch.load' and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(where)
        elif name in ('torch.jit.load', 'jit.load', 'load_learner') or name.endswith('.load_learner'):
            found.append(where)
        elif name.split('.')[0] in ('pickle', 'dill', 'joblib', 'cloudpickle', 'marshal') and \
                name.split('.')[-1] in ('load', 'loads', 'Unpickler'):
            found.append(where)
        elif name in ('np.load', 'numpy.load') and isinstance(keywords.get('allow_pickle'), ast.Constant) and \
                keywords['allow_pickle'].value:
            found.append(where)
    return found


def test_no_file_in_the_project_is_loaded_unsafely():
    """A regression guard over the project's own code (tests deliberately unpickle to prove payloads real)."""
    sources = _project_sources()
    assert any(p.name == 'training.py' for p in sources) and any(p.name == 'submit.py' for p in sources)
    found = [hit for path in sources for hit in _unsafe_loads(path)]
    assert not found, 'unsafe loads:\n' + '\n'.join(found)


def test_the_unsafe_load_guard_catches_each_kind(tmp_path):
    probe = tmp_path / 'probe.py'   # parsed only, never imported
    cases = ['torch.load(p)', 'torch.load(p, weights_only=False)', 'torch.load(p, map_location="cpu")',
             'x.load(p, weights_only=False)', 'torch.jit.load(p)', 'pickle.load(f)', 'pickle.loads(b)',
             'np.load(p, allow_pickle=True)', 'load_learner(p)']
    for case in cases:
        probe.write_text(case + '\n')
        assert _unsafe_loads(probe), case
    probe.write_text('torch.load(p, map_location="cpu", weights_only=True)\nnp.load(p)\n')
    assert not _unsafe_loads(probe)


# ============================================================================ 2. export writes atomically
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


# ============================================================================ 3. data that cannot train
def _colour_photo(path: Path, rgb, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def _folder(root: Path, counts: dict[str, int] | None = None) -> Path:
    """The colour data set (12 photos per class unless `counts` says otherwise), named like Flickr photos."""
    for k, (name, rgb) in enumerate(COLOURS.items()):
        for i in range((counts or {}).get(name, 12)):
            _colour_photo(root / name / f'{1000000 * (k + 1) + i}_x.jpg', rgb, seed=100 * k + i)
    return root


def _assert_nothing_trained(run: Path) -> None:
    assert not (run / 'models').exists() and not (run / 'metrics.json').exists()


def test_a_class_emptied_by_the_audit_stops_before_training(tmp_path):
    data = _folder(tmp_path / 'data')
    for photo in (data / 'rose').glob('*.jpg'):       # every rose photo is also filed under tulip
        shutil.copy(photo, data / 'tulip' / photo.name.replace('_x', '_copy'))
    run = tmp_path / 'run'
    with pytest.raises(ValueError) as err:
        train(TINY_CNN, data, run, pretrained=False)
    message = str(err.value)
    assert "'rose'" in message and '0 usable photo' in message and 'left out 12' in message, message
    assert 'audit' in message and '\n' not in message
    _assert_nothing_trained(run)


@pytest.mark.parametrize('case', ['one photo', 'two copies of one photo'])
def test_a_class_that_cannot_be_on_both_sides_of_the_split_stops_before_training(case, tmp_path):
    data = _folder(tmp_path / 'data', {'rose': 1 if case == 'one photo' else 0})
    if case == 'two copies of one photo':   # one Flickr id: one group, which the grouped split keeps on one side
        for i, suffix in enumerate(('_n', '_m')):
            _colour_photo(data / 'rose' / f'7166539842{suffix}.jpg', COLOURS['rose'], seed=900 + i)
    run = tmp_path / 'run'
    with pytest.raises(ValueError, match="'rose'") as err:
        train(TINY_CNN, data, run, pretrained=False, split='stratified' if case == 'one photo' else 'grouped')
    assert '\n' not in str(err.value)
    _assert_nothing_trained(run)


def test_fewer_training_photos_than_one_batch_stops_before_training(colour_folder, tmp_path):
    run = tmp_path / 'run'
    with pytest.raises(ValueError) as err:   # 45 training photos, batch 64: fastai would train 0 batches
        train(TINY_CNN.override(bs=64), colour_folder, run, pretrained=False)
    assert '45 training photos' in str(err.value) and '--bs' in str(err.value)
    _assert_nothing_trained(run)


def test_metrics_json_is_strict_json_even_for_a_class_without_validation_photos(tmp_path, monkeypatch):
    from flowers_fastai import training

    class Interpretation:   # a confusion matrix whose rose row is empty: 0/0 accuracy
        @staticmethod
        def confusion_matrix():
            cm = np.diag([3, 3, 0, 3, 3])
            return cm

        def plot_confusion_matrix(self, **kwargs):
            pass
    monkeypatch.setattr(training.ClassificationInterpretation, 'from_learner', lambda learn: Interpretation())
    training.report_run(None, tmp_path)
    metrics = strict_json(tmp_path / 'metrics.json')
    assert metrics['per_class_accuracy']['rose'] is None and metrics['valid_accuracy'] == 1.0

    from flowers_fastai.run_folder import write_json
    with pytest.raises(ValueError):   # the writer itself refuses NaN, and leaves nothing behind
        write_json(tmp_path / 'bad.json', {'accuracy': float('nan')})
    assert not (tmp_path / 'bad.json').exists() and not list(tmp_path.glob('.*.tmp'))


# ============================================================================ 4. half-written run folders
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


EXPORT_DAMAGE = {
    'truncated best.pth': ('models/best.pth', _truncate),
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
    _truncate(truncated / 'models' / 'best.pth')
    (broken / 'config.json').write_text('{')
    for age, run in enumerate((broken, truncated, good)):   # the good run is the oldest
        os.utime(run / 'metrics.json', (1e9 - age * 1000, 1e9 - age * 1000))
    out = tmp_path / 'cnn_flowers.pth'
    assert export.main(['--runs', str(runs), '--family', 'cnn', '--out', str(out), '--no-calibrate']) == 0
    assert json.loads(out.with_suffix('.json').read_text())['run'] == 'a-good'
    err = capsys.readouterr().err
    assert f'skipped {truncated}' in err and f'skipped {broken}' in err and 'best.pth' in err
    assert err.count(f'skipped {broken}') == 1

    _truncate(good / 'models' / 'best.pth')   # nothing left to export: an error, not a traceback
    with pytest.raises(SystemExit) as info:
        export.main(['--runs', str(runs), '--family', 'cnn', '--out', str(out), '--no-calibrate'])
    assert isinstance(info.value.code, str) and info.value.code.startswith('error: ')


RESUME_DAMAGE = {
    'last.pth without a position': ('models/last.pth', lambda p: torch.save({'model': resume_point(p.parent.parent)
                                                                             ['model']}, p)),
    'last.pth whose EMA is not an average': ('models/last.pth', lambda p: torch.save(
        {**resume_point(p.parent.parent), 'ema': {'steps': 3}}, p)),
    'truncated last.pth': ('models/last.pth', _truncate),
    'missing last.pth': ('models/last.pth', Path.unlink),
    'broken config.json': ('config.json', lambda p: p.write_text('')),
}


@pytest.mark.parametrize('damage', list(RESUME_DAMAGE))
def test_resume_of_a_half_written_run_says_which_file_and_what_to_do(damage, cnn_run, colour_folder, tmp_path):
    run = copy_run(cnn_run, tmp_path / 'run')
    as_interrupted_after_epoch_0(run)
    name, harm = RESUME_DAMAGE[damage]
    harm(run / name)
    with pytest.raises(ValueError) as err:
        train(TINY_EMA.override(epochs=2), colour_folder, run, pretrained=False, resume=True)
    message = str(err.value)
    assert str(run / name) in message and '--name' in message and '\n' not in message, message


def test_train_cli_resume_of_a_truncated_checkpoint_exits_with_one_sentence(cnn_run, tmp_path):
    import train as train_cli
    run = copy_run(cnn_run, tmp_path / 'runs' / 'r')
    as_interrupted_after_epoch_0(run)
    _truncate(run / 'models' / 'last.pth')
    with pytest.raises(SystemExit) as info:
        train_cli.main(['cnn', '--name', 'r', '--runs', str(tmp_path / 'runs'), '--resume'])
    code = info.value.code
    assert isinstance(code, str) and code.startswith('error: ') and 'last.pth' in code and '\n' not in code


def test_an_interrupted_checkpoint_write_leaves_the_previous_resume_point_whole(colour_folder, tmp_path,
                                                                              monkeypatch):
    """The root of half-written run folders: checkpoints are written to a temporary file and renamed, so a
    crash mid-write (here: in epoch 1's last.pth) leaves epoch 0's resume point loadable."""
    run, original, seen = tmp_path / 'run', torch.save, []

    def dies_in_the_second_last_pth(obj, f, *args, **kwargs):
        if 'last.pth' in str(f):
            seen.append(f)
            if len(seen) == 2:
                Path(f).write_bytes(b'half a checkpoint')
                raise KeyboardInterrupt('killed mid-write')
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', dies_in_the_second_last_pth)
    recipe = TINY_CNN.override(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, colour_folder, run, pretrained=False, split='stratified')
    monkeypatch.setattr(torch, 'save', original)
    assert resume_point(run)['epoch'] == 0
    assert not list((run / 'models').glob('.*.tmp'))
    train(recipe, colour_folder, run, pretrained=False, resume=True)
    assert list(pd.read_csv(run / 'history.csv').epoch) == [0, 1, 1, 2]   # epoch 1 was cut short, trained again
    assert strict_json(run / 'metrics.json')['n_valid'] == 15


def test_the_audit_report_warns_of_a_class_it_empties(tmp_path):
    from flowers_fastai.audit import audit_items
    from flowers_fastai.data import scan_image_folder
    data = _folder(tmp_path / 'data', {c: 3 for c in COLOURS})
    for photo in (data / 'rose').glob('*.jpg'):
        shutil.copy(photo, data / 'tulip' / photo.name.replace('_x', '_copy'))
    report = audit_items(scan_image_folder(data).items).report()
    assert "class 'rose' keeps 0 of its 3 photos" in report
    assert report.count('Warning:') == 1   # tulip keeps its own 3 photos


# ------------------------------------------------------------------------------------------ divergence
TINY_CLI = ['--arch', 'convnextv2_atto', '--size', '32', '--bs', '8', '--epochs', '1', '--valid-pct', '0.25',
            '--no-pretrained', '--randaugment', '0', '--color-jitter', '0', '--random-erasing', '0', '--mixup', '0',
            '--cutmix', '0', '--ema-decay', '0', '--patience', '0', '--lr-base-bs', '0']


def test_a_run_that_diverges_stops_with_one_sentence_and_a_non_zero_status(colour_folder, tmp_path):
    """--lr 1e4 turns the loss to NaN: the run used to go on and exit 0 with NaN weights."""
    import train as train_cli
    with pytest.raises(SystemExit) as info:
        train_cli.main(['cnn', '--data', str(colour_folder), '--name', 'r', '--runs', str(tmp_path), '--lr', '1e4',
                        *TINY_CLI])
    code = info.value.code
    assert isinstance(code, str) and code.startswith('error: training diverged') and '\n' not in code, code
    assert not (tmp_path / 'r' / 'metrics.json').exists()


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


# ------------------------------------------------------------------------------------------ options that cannot train
@pytest.mark.parametrize('option', [['--arch', 'convnextv2_gigantic'], ['--bs', '0'], ['--accumulate', '0'],
                                    ['--accumulate', '-1'], ['--lr', '0'], ['--lr=-1e-3'], ['--lr', 'nan'],
                                    ['--epochs', '-2']])
def test_an_option_that_cannot_train_is_refused_with_one_sentence(option, colour_folder, tmp_path):
    import train as train_cli
    with pytest.raises(SystemExit) as info:
        train_cli.main(['cnn', '--data', str(colour_folder), '--name', 'r', '--runs', str(tmp_path), *TINY_CLI,
                        *option])
    code = info.value.code
    assert isinstance(code, str) and code.startswith(f"error: {option[0].split('=')[0]}") and '\n' not in code, code
    assert not (tmp_path / 'r').exists()   # refused before anything was made


RESUME_FIELDS = {'recipe not an object': lambda c: {**c, 'recipe': [1, 2]},
                 'lr a string': lambda c: {**c, 'recipe': {**c['recipe'], 'lr': 'fast'}},
                 'bs 0': lambda c: {**c, 'recipe': {**c['recipe'], 'bs': 0}},
                 'accumulate -1': lambda c: {**c, 'recipe': {**c['recipe'], 'accumulate': -1}},
                 'unknown arch': lambda c: {**c, 'recipe': {**c['recipe'], 'arch': 'resnet9000'}},
                 'pretrained a list': lambda c: {**c, 'pretrained': [1]}}


@pytest.mark.parametrize('damage', list(RESUME_FIELDS))
def test_resume_checks_every_field_it_reads_back_from_the_run_folder(damage, cnn_run, tmp_path):
    import train as train_cli
    run = copy_run(cnn_run, tmp_path / 'runs' / 'r')
    as_interrupted_after_epoch_0(run)
    config = run / 'config.json'
    config.write_text(json.dumps(RESUME_FIELDS[damage](json.loads(config.read_text()))))
    with pytest.raises(SystemExit) as info:
        train_cli.main(['cnn', '--name', 'r', '--runs', str(tmp_path / 'runs'), '--resume'])
    code = info.value.code
    assert isinstance(code, str) and code.startswith(f'error: {config} cannot be resumed') and '\n' not in code, code
    assert not (run / 'metrics.json').exists()
