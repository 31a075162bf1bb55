"""The notebook face (flowers_fastai/notebook.py): `learner(family, data, **overrides)` is the Learner train.py
trains, `learn.fit_recipe()` runs the recipe's phases on it, and docs/notebook.ipynb runs top to bottom on a tiny
subset."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from flowers_fastai.architectures import infer_cnn_arch
from flowers_fastai.recipes import CNN, Phase

from .helpers import DATA_DIR, REPO, timm_convnextv2_source, write_cnn_file

NOTEBOOK = REPO / 'docs' / 'notebook.ipynb'
TINY = dict(arch='convnextv2_atto', size=32, bs=8)


@pytest.fixture(scope='module')
def stand_in_weights(tmp_path_factory):
    """(file, tensors): convnextv2_atto's ImageNet weights as timm publishes them (model.safetensors), random."""
    source = timm_convnextv2_source('convnextv2_atto', seed=3)
    return write_cnn_file(source, tmp_path_factory.mktemp('published'), 'safetensors'), source


def _trains(learn) -> list[bool]:
    """Per parameter group of the splitter (stem ... head): does it train?"""
    return [any(p.requires_grad for p in group) for group in learn.splitter(learn.model)]


# ----------------------------------------------------------------------------------------------- learner()
def test_learner_is_the_learner_train_py_trains(colour_folder, tmp_path):
    from flowers_fastai.notebook import learner
    from flowers_fastai.training import prepare_learner
    learn = learner('cnn', colour_folder, pretrained=False, run_dir=tmp_path / 'nb', **TINY)
    ref, _ = prepare_learner(CNN.override(**TINY), colour_folder, tmp_path / 'ref', pretrained=False)
    # the same seeded grouped split, model (initial weights included), loss, optimizer, splitter, callbacks
    for side in ('train_ds', 'valid_ds'):
        assert list(getattr(learn.dls, side).items.path) == list(getattr(ref.dls, side).items.path)
    assert len(learn.dls.valid_ds) == 12   # 20 % of 5 x 12 photos
    reference = ref.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in learn.model.state_dict().items())
    assert len(learn.splitter(learn.model)) == len(ref.splitter(ref.model)) == 6   # stem, 3 x stages, stage 3, head
    assert type(learn.loss_func) is type(ref.loss_func)
    assert learn.loss_func.func.label_smoothing == CNN.label_smoothing == 0.1
    assert learn.opt_func is ref.opt_func and learn.wd == ref.wd == CNN.wd and learn.train_bn is False
    assert [type(cb).__name__ for cb in learn.cbs] == [type(cb).__name__ for cb in ref.cbs]
    assert learn.path == tmp_path / 'nb'


def test_learner_reads_several_folders_and_reports_each(colour_folder, tmp_path):
    import shutil
    from flowers_fastai.notebook import learner
    second = tmp_path / 'second'
    shutil.copytree(colour_folder, second)
    learn = learner('cnn', [colour_folder, second], pretrained=False, run_dir=tmp_path / 'nb', split='stratified',
                    **TINY)
    assert [m.name for m in learn.metrics] == ['accuracy', f'accuracy_{colour_folder.name}', 'accuracy_second']
    assert set(learn.dls.valid_ds.items.source) == {0, 1}
    assert learn.run_recipe.config.data == (str(colour_folder.resolve()), str(second.resolve()))


def test_learner_overrides_land_in_the_model_and_the_dataloaders(colour_folder, tmp_path):
    from flowers_fastai.notebook import learner, phases
    learn = learner('cnn', colour_folder, arch='convnextv2_atto', size=48, bs=4, lr=3e-3, epochs=4,
                    pretrained=False, limit=40, split='stratified', run_dir=tmp_path / 'run')
    assert infer_cnn_arch(learn.model.state_dict()) == 'convnextv2_atto'   # the recipe's default is _tiny
    for dl in (learn.dls.train, learn.dls.valid):
        xb, yb = dl.one_batch()
        assert tuple(xb.shape) == (4, 3, 48, 48) and len(yb) == 4
    assert len(learn.dls.train_ds) + len(learn.dls.valid_ds) == 40               # limit
    assert (learn.run_recipe.recipe.lr, learn.run_recipe.recipe.epochs) == (3e-3, 4)
    assert phases(learn) == [Phase('scratch', epochs=4, trainable=None, lr_div=1.0, layerwise=False)]


def test_pretrained_file_loads_the_backbone_and_freezes_it_for_the_frozen_phase(colour_folder, tmp_path, stand_in_weights):
    from flowers_fastai.notebook import learner, phases
    path, source = stand_in_weights
    learn = learner('cnn', colour_folder, pretrained=path, run_dir=tmp_path / 'a', **TINY)
    state = learn.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith('head.fc.'))
    assert _trains(learn) == [False] * 5 + [True]   # as vision_learner gives it: the head only
    assert [p.name for p in phases(learn)] == ['frozen', 'full']
    assert learn.run_recipe.config.pretrained == str(path)

    scratch = learner('cnn', colour_folder, pretrained=False, run_dir=tmp_path / 'b', **TINY)
    assert not torch.equal(scratch.model.state_dict()['stem.0.weight'], source['stem.0.weight'])
    assert _trains(scratch) == [True] * 6
    assert [p.name for p in phases(scratch)] == ['scratch']


def test_unknown_override_is_a_type_error_naming_the_valid_ones(tmp_path):
    from flowers_fastai.notebook import learner
    with pytest.raises(TypeError) as info:
        learner('cnn', tmp_path, learning_rate=1e-3, size=32)
    message = str(info.value)
    assert 'learning_rate' in message and 'size' not in message.split(';')[0]
    for valid in ('pretrained', 'run_dir', 'limit', 'lr', 'arch', 'bs', 'epochs'):
        assert valid in message.split(';')[1]
    with pytest.raises(ValueError, match="'cnn', 'teacher', 'vit'"):
        learner('resnet', tmp_path)


def test_fit_recipe_trains_the_phases_into_a_run_folder_once(colour_folder, tmp_path):
    import matplotlib
    from flowers_fastai.notebook import learner
    learn = learner('cnn', colour_folder, pretrained=False, run_dir=tmp_path / 'run', epochs=2, patience=0, **TINY)
    backend = matplotlib.get_backend()
    matplotlib.use('svg')   # stands for a notebook's inline backend: the run's reports must not take it away
    try:
        assert learn.fit_recipe() is learn
        assert matplotlib.get_backend() == 'svg'
    finally:
        matplotlib.use(backend)
    history = pd.read_csv(tmp_path / 'run' / 'history.csv')
    assert list(history.phase) == ['scratch'] * 2
    config = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert config['recipe']['arch'] == 'convnextv2_atto' and config['n_valid'] == 12
    assert (tmp_path / 'run' / 'models' / 'best.pth').is_file() and (tmp_path / 'run' / 'metrics.json').is_file()
    with pytest.raises(FileExistsError, match='already holds'):
        learn.fit_recipe()
    with pytest.raises(FileExistsError, match='already holds'):
        learner('cnn', colour_folder, pretrained=False, run_dir=tmp_path / 'run', **TINY)


def test_fit_recipe_is_a_learner_method_reading_the_recipe_from_a_callback(colour_folder, tmp_path):
    from fastai.learner import Learner
    from flowers_fastai.callbacks import ProgressiveResize, RunRecipe
    from flowers_fastai.notebook import learner, phases
    assert Learner.fit_recipe.__qualname__ == 'Learner.fit_recipe'   # fastcore's @patch, as fastai's fine_tune
    learn = learner('cnn', colour_folder, pretrained=False, run_dir=tmp_path / 'run', **TINY)
    # the run's state lives in callbacks (fastai names them learn.run_recipe, learn.progressive_resize), not in
    # attributes set on the Learner
    assert isinstance(learn.run_recipe, RunRecipe) and learn.run_recipe in learn.cbs
    assert learn.run_recipe.recipe == CNN.override(**TINY) and learn.run_recipe.pretrained is False
    assert isinstance(learn.progressive_resize, ProgressiveResize) and learn.progressive_resize.dls_size == 32
    assert not {'recipe', 'pretrained', 'run_config', 'dataloaders_at', 'dls_size'} & set(vars(learn))
    assert not hasattr(learn, 'recipe')

    plain = Learner(learn.dls, torch.nn.Linear(3, 5))
    with pytest.raises(TypeError, match=r'made by flowers_fastai\.learner'):
        plain.fit_recipe()
    with pytest.raises(TypeError, match=r'made by flowers_fastai\.learner'):
        phases(plain)
    assert not (tmp_path / 'run' / 'models').exists()   # nothing was trained


def test_package_gives_learner_lazily_without_fastai_on_import():
    code = ("import sys, flowers_fastai, flowers_fastai.submit\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'fastai'], 'fastai imported too early'\n"
            "from flowers_fastai import learner\n"
            "from flowers_fastai.notebook import learner as real\n"
            "assert learner is real and 'fastai' in sys.modules\n"
            "from fastai.learner import Learner\n"
            "assert callable(Learner.fit_recipe)\n"
            "print('OK')")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert out.returncode == 0 and out.stdout.strip() == 'OK', out.stderr[-2000:]


# ----------------------------------------------------------------------------------------- the notebook
def _execute(notebook_path, parameters: str, tmp_path):
    """Run the notebook in a fresh kernel from docs/, with `parameters` injected after its `parameters` cell (as
    papermill does) and a last cell that prints what the test checks as JSON."""
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    nb = nbformat.read(notebook_path, as_version=4)
    at = next(i for i, cell in enumerate(nb.cells) if 'parameters' in cell.metadata.get('tags', []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json\n"
        "print(json.dumps({'valley': float(suggestion.valley), 'cm': interp.confusion_matrix().tolist(),\n"
        "                  'n_valid': len(learn.dls.valid_ds), 'path': str(learn.path)}))"))
    nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                            resources={'metadata': {'path': str(notebook_path.parent)}}).execute()
    return nb


@pytest.mark.loopback   # the kernel talks to this process over 127.0.0.1
def test_notebook_runs_on_a_tiny_subset(tmp_path, monkeypatch, stand_in_weights):
    if not DATA_DIR.is_dir():
        pytest.skip(f'real photos not available: {DATA_DIR} is absent')
    for var in ('IPYTHONDIR', 'JUPYTER_RUNTIME_DIR', 'JUPYTER_DATA_DIR'):   # nothing written to the home folder
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run = tmp_path / 'run'
    nb = _execute(NOTEBOOK, f"data = {str(DATA_DIR)!r}\nlimit = 40\npretrained = {str(stand_in_weights[0])!r}\n"
                            f"overrides = dict(arch='convnextv2_atto', size=32, bs=8, freeze_epochs=1, epochs=2)\n"
                            f"run_dir = {str(run)!r}", tmp_path)
    facts = json.loads(nb.cells[-1].outputs[-1]['text'])
    assert np.isfinite(facts['valley']) and 1e-7 < facts['valley'] < 10        # lr_find suggested a rate
    cm = np.array(facts['cm'])
    assert cm.shape == (5, 5) and cm.sum() == facts['n_valid'] == 8              # every validation photo, once
    assert facts['path'] == str(run)
    # the recipe's phases, as many epochs as it says: frozen (the head) then full (everything)
    history = pd.read_csv(run / 'history.csv')
    assert list(history.phase) == ['frozen'] + ['full'] * 2
    assert json.loads((run / 'metrics.json').read_text())['n_valid'] == 8
    # the course's plots came out as pictures: the batch, lr_find, and after training the interpretation's
    pictured = {call: any('image/png' in o.get('data', {}) for cell in nb.cells if call in cell.source
                          for o in cell.get('outputs', []))
                for call in ('show_batch(', 'lr_find(', 'plot_confusion_matrix(', 'plot_top_losses(')}
    assert all(pictured.values()), pictured
    errors = [o for cell in nb.cells for o in cell.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors


def test_committed_notebook_is_small_with_a_parameters_cell():
    nbformat = pytest.importorskip('nbformat')
    assert NOTEBOOK.stat().st_size < 300_000   # outputs kept, photos as small JPEGs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [cell for cell in nb.cells if 'parameters' in cell.metadata.get('tags', [])]
    assert len(tagged) == 1 and 'pretrained =' in tagged[0].source and 'limit =' in tagged[0].source
