"""What a weights file and its sidecar may hold (flowers_fastai/weights_io.py reads the tensors,
flowers_fastai/sidecar.py the JSON beside them), through submit's loaders:

- a raw 5-class state_dict of the loader's family, every key and every shape the network is built from checked
  first, finite floating-point tensors only: anything else (another model, a fastai export, NaN / inf, integer or
  exotic tensors, non-str keys, nested dicts, a JPEG or half a file named .pth) is a ValueError naming the file and
  the key; fp16 files load as float32; a legacy (non-zip) `torch.save` file loads like a zip one;
- a sidecar is a small regular file holding one JSON object whose fields have the right type and range, or the
  ValueError names the sidecar and the field; integers where floats are expected and provenance fields are fine;
- no code in a file ever runs: crafted pickles, zip or legacy, are refused; nothing in the project loads a file with
  weights_only=False; the sizes a file declares are checked against its own size before anything is allocated.

The models are conftest's tiny random ones.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from flowers_fastai import submit
from flowers_fastai.labels import CLASSES
from flowers_fastai.submit import load_any_model, load_cnn_model, load_ensemble, load_vit_model, predict

from .helpers import (LOADERS, PHOTOS, REPO, RunsCode, crafted_torch_file, photo_answers, predict_strict,
                      rgb_jpeg, torch_load_calls)


def refusals_that_fail(case: str, path: Path, loaders, named: Path, expected: str) -> list[str]:
    """What goes wrong when each loader is given `path`: it loads, or refuses with something other than a
    ValueError naming `named` and saying `expected`. Any other exception (RecursionError, AttributeError ...) is
    such a failure, recorded rather than raised so that one run lists every case."""
    failures = []
    for load in loaders:
        try:
            load(path)
            failures.append(f'{case} ({load.__name__}): loaded')
        except ValueError as err:
            if str(named) not in str(err) or expected not in str(err):
                failures.append(f'{case} ({load.__name__}): {str(err)[:300]}')
        except BaseException as err:   # noqa: BLE001 - any other exception is the failure being tested
            failures.append(f'{case} ({load.__name__}): {type(err).__name__}: {str(err)[:300]}')
    return failures


def _save_like(tmp_path: Path, source: Path, state_dict, name: str) -> Path:
    """Save `state_dict` as tmp_path/name, with a copy of `source`'s sidecar beside it."""
    path = tmp_path / name
    torch.save(state_dict, path)
    if source.with_suffix('.json').is_file():
        shutil.copy(source.with_suffix('.json'), path.with_suffix('.json'))
    return path


def _state(weights_files, family) -> dict[str, torch.Tensor]:
    return dict(torch.load(weights_files[family], weights_only=True))


# ---------------------------------------------------------------------------------- what is no state_dict of the family
@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_jpeg_bytes_named_pth(family, tmp_path):
    path = tmp_path / 'photo.pth'
    buf = io.BytesIO()
    Image.new('RGB', (16, 16), (1, 2, 3)).save(buf, 'JPEG')
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_truncated_torch_file(family, tmp_path, weights_files):
    data = weights_files[family].read_bytes()
    path = tmp_path / 'half.pth'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)


def _other_state_dicts():
    torch.manual_seed(0)
    yield 'sequential', nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict()
    import timm
    # ConvNeXt V1 atto: same stem / stage layout and widths as V2 atto, but other block keys
    yield 'convnext_v1_atto', timm.create_model('convnext_atto', pretrained=False, num_classes=5).state_dict()
    try:
        import torchvision
    except ImportError:
        return
    yield 'resnet18', torchvision.models.resnet18(weights=None, num_classes=5).state_dict()


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_state_dict_of_another_model(family, tmp_path):
    for name, state_dict in _other_state_dicts():
        path = tmp_path / f'{name}.pth'
        torch.save(state_dict, path)
        with pytest.raises(ValueError) as err:
            LOADERS[family](path)
        assert str(path) in str(err.value), name


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_non_state_dict_objects(family, tmp_path):
    for name, obj in {'list': [torch.zeros(3)], 'tensor': torch.zeros(3), 'empty_dict': {},
                      'dict_with_ints': {'a.weight': torch.zeros(2), 'epoch': 3}}.items():
        path = tmp_path / f'{name}.pth'
        torch.save(obj, path)
        with pytest.raises(ValueError) as err:
            LOADERS[family](path)
        assert str(path) in str(err.value), name


@pytest.mark.parametrize('family, head', [('cnn', 'head.fc'), ('vit', 'head')])
def test_load_head_with_other_than_5_classes(family, head, tmp_path, weights_files):
    state_dict = torch.load(weights_files[family], weights_only=True)
    in_features = state_dict[f'{head}.weight'].shape[1]
    state_dict[f'{head}.weight'] = torch.zeros(7, in_features)
    state_dict[f'{head}.bias'] = torch.zeros(7)
    path = _save_like(tmp_path, weights_files[family], state_dict, 'seven.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert '7' in str(err.value) and '5' in str(err.value)
    assert str(path) in str(err.value)


@pytest.fixture(scope='module')
def fastai_export_file(tmp_path_factory) -> Path:
    """A real (tiny) fastai `learn.export()` pickle."""
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    from fastai.learner import Learner
    torch.manual_seed(0)
    items = [(torch.randn(4), torch.tensor(i % 2)) for i in range(8)]
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(6)), [6, 7]])
    learn = Learner(dsets.dataloaders(bs=4, device='cpu'), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss())
    path = tmp_path_factory.mktemp('fastai_export') / 'export.pkl'
    learn.export(path)
    assert path.is_file()
    return path


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_fastai_export_pickle_points_to_export_py(family, fastai_export_file, tmp_path):
    path = tmp_path / 'learner.pth'
    shutil.copy(fastai_export_file, path)
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert 'export.py' in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize('family, extra_key, missing_key', [
    ('cnn', 'stages.0.blocks.0.extra_scale', 'head.norm.weight'),
    ('cnn', 'head.fc.extra', 'stages.3.blocks.1.mlp.grn.weight'),
    ('vit', 'visual.extra_token', 'visual.ln_post.weight'),
    ('vit', 'head.extra', 'visual.transformer.resblocks.1.mlp.c_fc.bias'),
])
def test_load_checks_every_key(family, extra_key, missing_key, tmp_path, weights_files):
    state_dict = torch.load(weights_files[family], weights_only=True)
    assert missing_key in state_dict and extra_key not in state_dict

    extra = dict(state_dict, **{extra_key: torch.zeros(3)})
    path = _save_like(tmp_path, weights_files[family], extra, 'extra.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert extra_key in str(err.value)

    missing = {k: v for k, v in state_dict.items() if k != missing_key}
    path = _save_like(tmp_path, weights_files[family], missing, 'missing.pth')
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert missing_key in str(err.value)

    # the untouched state_dict itself loads: the failures above are about the one key
    LOADERS[family](_save_like(tmp_path, weights_files[family], state_dict, 'ok.pth'))


def _bad_state_dicts(state: dict[str, torch.Tensor], family: str):
    """(case, object to save, text the error must contain)."""
    key = 'stem.1.weight' if family == 'cnn' else 'visual.ln_pre.weight'
    nan, inf = state[key].clone(), state[key].clone()
    nan[0], inf[-1] = float('nan'), float('-inf')
    yield 'nan_weight', {**state, key: nan}, key
    yield 'inf_weight', {**state, key: inf}, key
    yield 'fp16_inf', {**state, key: inf.half()}, key
    yield 'fp64_beyond_fp32', {**state, key: torch.full_like(state[key], 1e300, dtype=torch.float64)}, key
    yield 'int_tensor', {**state, key: state[key].round().long()}, key
    yield 'bool_tensor', {**state, key: state[key] > 0}, key
    yield 'complex_tensor', {**state, key: state[key].to(torch.complex64)}, key
    yield 'fp8_tensor', {**state, key: state[key].to(torch.float8_e4m3fn)}, key
    yield 'sparse_tensor', {**state, key: state[key].to_sparse()}, key
    yield 'quantized_tensor', {**state, key: torch.quantize_per_tensor(state[key], 0.1, 0, torch.qint8)}, key
    yield 'meta_tensor', {**state, key: torch.empty(state[key].shape, device='meta')}, key
    yield 'int_key', {**state, 7: state[key]}, '7'
    yield 'tuple_key', {**state, ('a', 1): state[key]}, "('a', 1)"
    yield 'none_key', {None: state[key], **state}, 'None'
    yield 'int_value', {**state, 'epoch': 3}, 'epoch'
    yield 'str_value', {**state, key: 'weights'}, key
    yield 'list_value', {**state, key: [1.0, 2.0]}, key
    yield 'nested_dict', {'state_dict': state}, 'state_dict'
    yield 'nested_dict_beside', {**state, 'extra': {'a': state[key]}}, 'extra'
    yield 'top_level_list', list(state.values()), 'list'
    yield 'top_level_tuple', tuple(state.values()), 'tuple'
    yield 'top_level_tensor', state[key], 'Tensor'
    yield 'top_level_none', None, 'NoneType'
    yield 'top_level_str', 'state_dict', 'str'
    yield 'top_level_int', 5, 'int'


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_bad_weight_files_are_refused_at_load_naming_the_file_and_key(family, weights_files, tmp_path):
    loader = load_cnn_model if family == 'cnn' else load_vit_model
    failures = []
    for case, obj, expected in _bad_state_dicts(_state(weights_files, family), family):
        path = tmp_path / f'{case}.pth'
        torch.save(obj, path)
        shutil.copy(weights_files[family].with_suffix('.json'), path.with_suffix('.json'))
        failures += refusals_that_fail(case, path, (loader, load_any_model), named=path, expected=expected)
    assert not failures, '\n'.join(failures)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_shapes_the_network_is_built_from_are_checked_before_building_it(family, weights_files, tmp_path):
    state = _state(weights_files, family)
    keys = (['stem.0.weight', 'stages.0.blocks.0.conv_dw.weight', 'head.fc.weight'] if family == 'cnn' else
            ['visual.conv1.weight', 'visual.positional_embedding', 'visual.proj', 'head.weight'])
    failures = []
    for key in keys:
        for name, bad in (('scalar', torch.tensor(0.5)), ('empty', torch.zeros(0)),
                          ('one_row', state[key].flatten()[:1].reshape(1, *([1] * (state[key].ndim - 1))))):
            path = tmp_path / f'{key}-{name}.pth'
            torch.save({**state, key: bad}, path)
            shutil.copy(weights_files[family].with_suffix('.json'), path.with_suffix('.json'))
            try:
                (load_cnn_model if family == 'cnn' else load_vit_model)(path)
                failures.append(f'{key} {name}: loaded')
            except ValueError as err:
                if str(path) not in str(err):
                    failures.append(f'{key} {name}: {err}')
            except Exception as err:   # noqa: BLE001
                failures.append(f'{key} {name}: {type(err).__name__}: {err}')
    assert not failures, '\n'.join(failures)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_load_fp16_file_gives_float32_model(family, tmp_path, weights_files, vit_model, cnn_model):
    state_dict = torch.load(weights_files[family], weights_only=True)
    assert any(v.dtype == torch.float32 for v in state_dict.values())
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    path = _save_like(tmp_path, weights_files[family], half, 'half.pth')
    model = LOADERS[family](path)
    params = list(model.parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, half[k].float()), k
    predict_strict(model, rgb_jpeg(tmp_path))


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_finite_but_huge_weights_are_refused_at_load(family, tmp_path, weights_files):
    state = torch.load(weights_files[family], weights_only=True)
    huge = {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in state.items()}
    path = _save_like(tmp_path, weights_files[family], huge, f'{family}_huge.pth')
    with pytest.raises(ValueError, match='non-finite logits'):
        submit.load_any_model(path)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_a_legacy_torch_save_file_loads_like_a_zip_one(family, weights_files, tmp_path):
    state = _state(weights_files, family)
    path = tmp_path / f'legacy_{family}.pth'
    torch.save(state, path, _use_new_zipfile_serialization=False)
    shutil.copy(weights_files[family].with_suffix('.json'), path.with_suffix('.json'))
    with open(path, 'rb') as f:
        assert f.read(2) != b'PK'   # really not a zip file
    load = load_cnn_model if family == 'cnn' else load_vit_model
    assert photo_answers(load(path)) == photo_answers(load(weights_files[family]))
    # and it is checked like any other file
    key = next(iter(state))
    torch.save({**state, key: state[key] * float('nan')}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match='non-finite'):
        load(path)


# ------------------------------------------------------------------------------------------ sidecars
def _bad_sidecars(family: str):
    """(case, sidecar file text, text the error must contain besides the sidecar's path)."""
    base = {'family': family, **({'image_size': 32} if family == 'cnn' else {'quick_gelu': True, 'head_width': 32})}

    def field(name, value):
        return f'{name}={value!r}', json.dumps({**base, name: value}), name
    for text in ('[]', '"big"', '0', 'null', 'true', '[{"temperature": 2}]'):
        yield f'top_level {text}', text, 'object'
    yield 'invalid_json', '{"image_size": 32,', 'JSON'
    yield 'deeply_nested', '[' * 100_000 + ']' * 100_000, 'JSON'
    yield 'not_utf8', b'{"temperature": "\xff\xfe"}', 'JSON'
    yield 'huge_number', '{"temperature": ' + '9' * 5000 + '}', 'JSON'
    yield 'a_directory', None, 'cannot be read'
    for value in (0, -1.0, 'hot', None, True, [], {}, 1e-300, 1e300, 'NaN', -0.0):
        yield field('temperature', value)
    yield 'temperature=NaN literal', json.dumps(base)[:-1] + ', "temperature": NaN}', 'temperature'
    yield 'temperature=Infinity literal', json.dumps(base)[:-1] + ', "temperature": Infinity}', 'temperature'
    for value in ('big', [], 0, -32, 1.5, True, None, 8, 10**12, '224'):
        yield field('image_size', value)
    for value in ('rnn', 3, None, [], 'cnn' if family == 'vit' else 'vit'):
        yield field('family', value)
    yield field('classes', list(reversed(CLASSES)))
    yield field('classes', CLASSES[:4])
    yield field('classes', 'daisy')
    if family == 'vit':
        for value in ('false', 0, 1, [], None, 'true'):
            yield field('quick_gelu', value)
        for value in (0, -64, '64', 1.5, True, None, [], 24, 10**9):   # 24 does not divide the width (64)
            yield field('head_width', value)
        yield field('image_size', 64)   # the tensors say 32 px


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_bad_sidecars_are_refused_at_load_naming_the_sidecar_and_field(family, weights_files, tmp_path):
    failures = []
    for i, (case, text, expected) in enumerate(_bad_sidecars(family)):
        path = tmp_path / f'{i}.pth'
        shutil.copy(weights_files[family], path)
        sidecar = path.with_suffix('.json')
        if text is None:
            sidecar.mkdir()
        else:
            (sidecar.write_bytes if isinstance(text, bytes) else sidecar.write_text)(text)
        failures += refusals_that_fail(case, path, ((load_cnn_model if family == 'cnn' else load_vit_model),
                                                    load_any_model), named=sidecar, expected=expected)
    assert not failures, '\n'.join(failures)


@pytest.mark.parametrize('family', ['cnn', 'vit'])
def test_good_sidecars_still_load(family, weights_files, tmp_path):
    """Integers where floats are expected, provenance fields of any type, no sidecar at all: all fine."""
    for i, extra in enumerate([{'temperature': 2}, {'temperature': 0.5, 'run': ['x'], 'calibration': None},
                               {'classes': CLASSES}, {'image_size': 32}, None]):
        path = tmp_path / f'{i}.pth'
        shutil.copy(weights_files[family], path)
        if extra is not None:
            sidecar = json.loads(weights_files[family].with_suffix('.json').read_text())
            path.with_suffix('.json').write_text(json.dumps({**sidecar, **extra}))
        if family == 'vit' and extra is None:
            continue   # the tiny ViT needs its head_width (32, not the default 64) from the sidecar
        model = (load_cnn_model if family == 'cnn' else load_vit_model)(path)
        assert predict(model, PHOTOS[0]) in CLASSES
        assert isinstance(model.flowers_temperature, float)


@pytest.mark.parametrize('kind', ['fifo', 'dev_zero', 'dev_urandom', 'huge'])
def test_a_sidecar_is_read_only_from_a_small_regular_file(kind, weights_files, tmp_path):
    """A FIFO named <weights>.json made the load wait for a writer for ever; /dev/zero, /dev/urandom or a 3 GB
    file were read whole (MemoryError). Each is a ValueError naming the sidecar, at once (run in a child with a
    timeout, so that a hang fails)."""
    weights = tmp_path / 'cnn_flowers.pth'
    shutil.copy(weights_files['cnn'], weights)
    sidecar = weights.with_suffix('.json')
    if kind == 'fifo':
        os.mkfifo(sidecar)
    elif kind == 'huge':
        with sidecar.open('wb') as f:   # sparse: 3 GB declared, nothing written
            f.truncate(3 * 2 ** 30)
    else:
        sidecar.symlink_to(f'/dev/{kind[4:]}')
    script = textwrap.dedent(f'''
        from flowers_fastai.submit import load_cnn_model
        try:
            load_cnn_model({str(weights)!r})
        except ValueError as err:
            print('ValueError:', err)
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.startswith('ValueError:') and str(sidecar) in out.stdout, out.stdout + out.stderr
    assert 'regular file' in out.stdout or 'bytes' in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------ no code in a file ever runs
def test_the_crafted_payload_is_real(tmp_path):
    """The files below are dangerous for real: an unsafe load runs their code."""
    marker = tmp_path / 'marker'
    crafted_torch_file(tmp_path / 'evil.pth', marker, {'w': torch.ones(1)})
    torch.load(tmp_path / 'evil.pth', weights_only=False)
    assert marker.read_text() == 'code ran'


@pytest.mark.parametrize('family', ['cnn', 'vit'])
@pytest.mark.parametrize('container', ['torch_zip', 'plain_pickle'])
def test_load_pickle_that_carries_code_never_runs_it(family, container, tmp_path, weights_files):
    def write(path, marker):
        payload = dict(torch.load(weights_files[family], weights_only=True))
        payload['evil'] = RunsCode(marker)
        if container == 'torch_zip':
            torch.save(payload, path)
        else:
            with open(path, 'wb') as f:
                pickle.dump(payload, f)

    # the payload is real: an unsafe load does run it
    proof_marker = tmp_path / 'proof_marker'
    write(tmp_path / 'proof.pth', proof_marker)
    if container == 'torch_zip':
        torch.load(tmp_path / 'proof.pth', weights_only=False)
    else:
        with open(tmp_path / 'proof.pth', 'rb') as f:
            pickle.load(f)
    assert proof_marker.read_text() == 'code ran'

    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    write(path, marker)
    with pytest.raises(ValueError) as err:
        LOADERS[family](path)
    assert str(path) in str(err.value)
    assert not marker.exists(), 'code in the weights file was executed'


def test_a_legacy_file_that_carries_code_is_refused_without_running_it(weights_files, tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({**_state(weights_files, 'cnn'), 'evil': RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match='evil.pth'):
        load_cnn_model(path)
    assert not marker.exists()


def test_submit_loaders_refuse_a_crafted_weights_file(tmp_path, tiny_cnn_file):
    from flowers_fastai.submit import load_cnn_model
    marker = tmp_path / 'marker'
    path = crafted_torch_file(tmp_path / 'cnn_flowers.pth', marker, torch.load(tiny_cnn_file, weights_only=True))
    shutil.copy(tiny_cnn_file.with_suffix('.json'), path.with_suffix('.json'))
    with pytest.raises(ValueError):
        load_cnn_model(path)
    assert not marker.exists()


def test_nothing_is_ever_loaded_with_weights_only_false(weights_files, monkeypatch, tmp_path):
    calls = torch_load_calls(monkeypatch)
    legacy = tmp_path / 'legacy.pth'
    torch.save(_state(weights_files, 'cnn'), legacy, _use_new_zipfile_serialization=False)
    shutil.copy(weights_files['cnn'].with_suffix('.json'), legacy.with_suffix('.json'))
    load_cnn_model(weights_files['cnn'])
    load_cnn_model(legacy)
    load_ensemble(weights_files['cnn'], weights_files['vit'])
    load_any_model(weights_files['vit'])
    assert calls and all(w is True for w in calls), calls


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


# ------------------------------------------------------------------------------------------ sizes a file declares
def _crafted_zip(tmp_path: Path, data_pkl: bytes | None = None, deflated_record: int | None = None) -> Path:
    """A torch zip file of one tiny tensor, its pickle replaced by `data_pkl`, or its data record replaced by
    `deflated_record` zero bytes stored deflated (a zip bomb: a few KB on disk)."""
    import zipfile
    plain = tmp_path / 'plain.pth'
    torch.save({'w': torch.zeros(4)}, plain)
    out = tmp_path / 'crafted.pth'
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if data_pkl is not None and info.filename.endswith('/data.pkl'):
                data = data_pkl
            if deflated_record is not None and info.filename.endswith('/data/0'):
                dst.writestr(info.filename, b'\0' * deflated_record, compress_type=zipfile.ZIP_DEFLATED)
                continue
            dst.writestr(info, data)
    return out


def _declaring_pickle(numel: int) -> bytes:
    """The pickle of {'w': tensor} whose storage declares `numel` float32 elements."""
    import collections
    import io
    import pickle
    storage = object()

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, 0, (numel,), (1,), False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ('storage', torch.FloatStorage, '0', 'cpu', numel) if obj is storage else None
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(collections.OrderedDict(w=Tensor()))
    return buffer.getvalue()


@pytest.mark.parametrize('kind', ['pickle declares 1 GiB', 'deflated record of 256 MiB'])
def test_sizes_a_weights_file_declares_are_checked_before_reading(kind, tmp_path):
    """About 1 MB of crafted data made torch allocate 1 GiB before the file was refused: the declared sizes are
    checked against the file's own size first. Measured as the child's peak memory."""
    path = (_crafted_zip(tmp_path, data_pkl=_declaring_pickle(2 ** 28)) if kind.startswith('pickle')
            else _crafted_zip(tmp_path, deflated_record=2 ** 28))
    assert path.stat().st_size < 2 ** 20
    script = textwrap.dedent(f'''
        import resource
        import torch   # its own footprint is the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        from flowers_fastai.submit import load_cnn_model
        try:
            load_cnn_model({str(path)!r})
        except ValueError as err:
            print('ValueError:', err)
        print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent)})
    assert out.stdout.startswith('ValueError:') and 'declare' in out.stdout, out.stdout + out.stderr
    grew = int(out.stdout.split('grew_kb')[1])
    assert grew < 200 * 1024, f'loading took {grew // 1024} MB more'
