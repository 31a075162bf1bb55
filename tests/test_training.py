"""Training with fastai end to end on tiny models: the run folder and its reports, the phases and their learning
rates, EMA, early stopping, lr_find, data-parallel training, resume, and what cannot train:

- resume goes on after the last finished epoch from one resume point (models/last.pth), which a crash mid-write
  leaves whole; a half-written run folder, or a config.json field out of range, is one sentence naming the file and
  what to do;
- no checkpoint is ever unpickled unsafely: a crafted best.pth or last.pth is refused and its code never runs;
- data that cannot train (a class emptied by the audit, a class on one side of the split, fewer photos than one
  batch), a run that diverges and options that cannot train stop with one sentence before anything is trained;
  metrics.json is always strict JSON.

Exporting a finished run is test_export.py's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flowers_fastai.exporting import export_run
from flowers_fastai.preprocess import load_for_model
from flowers_fastai.recipes import CNN, VIT
from flowers_fastai.submit import load_cnn_model, load_vit_model
from flowers_fastai.training import train

from .helpers import (COLOURS, PLAIN, REPO, StageSpy, TINY_CNN, TINY_EMA, colour_data_folder, colour_photo, copy_run,
                      crafted_torch_file, fastai_logits, interrupt_after_first_epoch, resume_point,
                      set_resume_position, torch_load_calls, truncate_file)


def strict_json(path: Path):
    """JSON as the standard has it: NaN / Infinity are not JSON (Python's json accepts them by default)."""
    def refuse(name):
        raise ValueError(f'{path}: {name} is not JSON')
    return json.loads(path.read_text(), parse_constant=refuse)


def as_interrupted_after_epoch_0(run: Path) -> None:
    """The run folder as a 2-epoch run looks after its first epoch: resume loads models/last.pth and goes on."""
    set_resume_position(run, phase=0, epoch=0)
    (run / 'metrics.json').unlink()


def _assert_nothing_trained(run: Path) -> None:
    assert not (run / 'models').exists() and not (run / 'metrics.json').exists()


def test_cnn_run_learns_and_writes_its_reports(colour_folder, tmp_path):
    run = tmp_path / 'run'
    train(TINY_CNN.override(epochs=6), colour_folder, run, pretrained=False)
    history = pd.read_csv(run / 'history.csv')
    assert list(history.columns) == ['phase', 'epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    assert list(history.epoch) == list(range(6))
    assert history.train_loss.iloc[-1] < history.train_loss.iloc[0]        # it learns
    metrics = json.loads((run / 'metrics.json').read_text())
    assert metrics['valid_accuracy'] == pytest.approx(history.accuracy.max())  # the best epoch is kept
    assert metrics['valid_accuracy'] >= 0.6                                     # chance is 0.2
    cm = np.loadtxt(run / 'confusion_matrix.csv', delimiter=',')
    assert cm.shape == (5, 5) and cm.sum() == metrics['n_valid'] == 15
    assert (run / 'confusion_matrix.png').stat().st_size > 1000
    config = json.loads((run / 'config.json').read_text())
    assert config['recipe']['arch'] == 'convnextv2_atto' and config['n_train'] == 45
    with pytest.raises(FileExistsError):
        train(TINY_CNN, colour_folder, run, pretrained=False)


@pytest.mark.parametrize('split', ['stratified', 'grouped'])
def test_split_seed_keeps_the_split_while_the_seed_changes(colour_folder, tmp_path, split):
    """Students of several seeds on their teacher's split (--split-seed); without it the split follows --seed.
    The scripts that re-score a run (`rebuild_split`: validation_report, paired_compare, input_size_sweep) find
    the photos training held out, not the split of the run's `seed`."""
    from flowers_fastai.exporting import rebuild_split
    from flowers_fastai.run_config import RunConfig
    from flowers_fastai.training import prepare_learner

    def valid_photos(**seeds):
        learn, config = prepare_learner(TINY_CNN.override(**seeds), colour_folder, tmp_path / f'{split}{seeds}',
                                        pretrained=False, split=split)
        held_out = set(map(str, learn.dls.valid_ds.items.path))
        saved = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))   # as read back from config.json
        items, _, valid_idx, _ = rebuild_split(saved)
        assert {str(items[i][0]) for i in valid_idx} == held_out
        return held_out, saved.recipe.split_seed
    base, _ = valid_photos(seed=0)
    assert valid_photos(seed=1, split_seed=0) == (base, 0)       # another seed, the teacher's split
    assert valid_photos(seed=1)[0] != base                        # -1: the split follows the seed


def test_resume_continues_after_the_last_finished_epoch(colour_folder, tmp_path, monkeypatch):
    run = tmp_path / 'run'
    resume_training = interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(TINY_CNN.override(epochs=3), colour_folder, run, pretrained=False, split='stratified')
    assert resume_point(run)['epoch'] == 0
    resume_training()

    learn = train(TINY_CNN.override(epochs=3), colour_folder, run, pretrained=False, resume=True)
    history = pd.read_csv(run / 'history.csv')
    assert list(history.epoch) == [0, 1, 2]            # epoch 0 is not trained twice, none is skipped
    assert resume_point(run)['phase'] == 1 and resume_point(run)['epoch'] == -1   # the one phase is done
    # the resumed run validates on the split it started with (stratified), not on today's default
    from flowers_fastai.data import scan_image_folder, stratified_split
    items = scan_image_folder(colour_folder).items
    _, valid = stratified_split([label for _, label in items], TINY_CNN.valid_pct, TINY_CNN.seed)
    assert set(learn.dls.valid_ds.items.path) == {items[i][0] for i in valid}


def test_vit_stages_freeze_unfreeze_and_decay_lrs_per_block(colour_folder, tmp_path, tiny_clip_name, monkeypatch):
    import open_clip
    from flowers_fastai import training
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name, pretrained=None)
    stand_in = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(clip.state_dict(), stand_in)
    spy, make = StageSpy(), training.make_learner
    monkeypatch.setattr(training, 'make_learner', lambda *a, **k: make(*a, **k).add_cb(spy.callback()))
    recipe = VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, freeze_epochs=1, final_epochs=1,
                          unfreeze_blocks=1, llrd=0.5, valid_pct=0.25, **PLAIN)
    learn = train(recipe, colour_folder, tmp_path / 'run', pretrained=stand_in)
    assert list(pd.read_csv(tmp_path / 'run' / 'history.csv').phase) == ['frozen', 'partial', 'final']

    # groups: [embeddings], [block 0], [block 1 + ln_post + proj], [head]
    probe, partial, final = spy.phases
    assert probe['trains'] == [False, False, False, True] and probe['frozen'] == [True, True, True, False]
    assert partial['trains'] == [False, False, True, True] and partial['frozen'][:2] == [True, True]
    assert final['trains'] == [True, True, True, True]
    top = recipe.lr / recipe.backbone_lr_div
    for phase in (partial, final):   # one-cycle scales every group alike: the ratios to the head are the recipe's
        expected = np.array([top * 0.25, top * 0.5, top, recipe.lr]) / recipe.lr
        np.testing.assert_allclose(np.array(phase['lr']) / phase['lr'][-1], expected, rtol=1e-6)
    # same epochs, same point of the schedule: the final phase runs at the partial phase's LRs / final_lr_div
    np.testing.assert_allclose(np.array(final['lr']) * recipe.final_lr_div, partial['lr'], rtol=1e-6)

    out = export_run(tmp_path / 'run', tmp_path / 'vit_flowers.pth')
    state = torch.load(out, map_location='cpu', weights_only=True)
    assert {k.split('.')[0] for k in state} == {'visual', 'head'} and state['head.weight'].shape == (5, 32)
    model = load_vit_model(out)
    assert model.spec == learn.model.spec
    photo = next(iter(colour_folder.glob('rose/*.jpg')))
    torch.testing.assert_close(model(load_for_model(photo, model.flowers_preprocessing))[0],
                               fastai_logits(learn, [photo])[0], atol=1e-5, rtol=0)


def test_cnn_phases_head_then_last_stage_then_all_with_per_stage_lrs(colour_folder, tmp_path, monkeypatch):
    from flowers_fastai import training
    stand_in = tmp_path / 'model.safetensors'
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model('convnextv2_atto', num_classes=1000).state_dict(), stand_in)
    spy, make = StageSpy(), training.make_learner
    monkeypatch.setattr(training, 'make_learner', lambda *a, **k: make(*a, **k).add_cb(spy.callback()))
    train(TINY_CNN.override(freeze_epochs=1, frozen_phase_blocks=1, llrd=0.5), colour_folder, tmp_path / 'run',
          pretrained=stand_in)
    head_and_last_stage, full = spy.phases   # groups: [stem], [stage 0..2] x3, [stage 3], [head]
    assert head_and_last_stage['trains'] == [False] * 4 + [True, True]
    assert full['trains'] == [True] * 6
    top = TINY_CNN.lr / TINY_CNN.backbone_lr_div
    expected = np.array([top / 16, top / 8, top / 4, top / 2, top, TINY_CNN.lr]) / TINY_CNN.lr
    np.testing.assert_allclose(np.array(full['lr']) / full['lr'][-1], expected, rtol=1e-6)


def test_train_help_documents_every_option():
    out = subprocess.run([sys.executable, 'train.py', '--help'], cwd=REPO, capture_output=True, text=True, check=True)
    for option in ['--data', '--arch', '--size', '--bs', '--epochs', '--freeze-epochs', '--lr', '--wd',
                   '--label-smoothing', '--drop-path', '--seed', '--resume', '--pretrained-file', '--no-pretrained']:
        assert option in out.stdout
    assert 'default: 0.1 / 0.05' in out.stdout  # label smoothing: the brief's cnn / vit defaults


def test_amp_on_cuda_only_fp32_on_cpu(colour_folder, monkeypatch):
    from fastai.callback.fp16 import MixedPrecision
    from flowers_fastai import training
    from flowers_fastai.data import flower_dataloaders, scan_image_folder
    from flowers_fastai.models import create_model
    dls = flower_dataloaders(scan_image_folder(colour_folder).items, training.preprocessing_for(TINY_CNN), bs=8)
    on_cpu = training.make_learner(TINY_CNN, dls, create_model(TINY_CNN, pretrained=False), colour_folder)
    assert not any(isinstance(cb, MixedPrecision) for cb in on_cpu.cbs)
    monkeypatch.setattr(training, 'default_device', lambda: torch.device('cuda'))
    on_gpu = training.make_learner(TINY_CNN, dls, create_model(TINY_CNN, pretrained=False), colour_folder)
    assert any(isinstance(cb, MixedPrecision) for cb in on_gpu.cbs)


def test_one_resume_point_holds_weights_optimizer_ema_and_position(colour_folder, tmp_path, monkeypatch):
    """models/last.pth is the run's only resume point (no state.json, no separate EMA file): an interrupted run
    with a weight EMA goes on averaging where it stopped."""
    run, recipe = tmp_path / 'run', TINY_CNN.override(epochs=2, ema_decay=0.9)
    resume_training = interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, colour_folder, run, pretrained=False)
    saved = resume_point(run)
    assert {'model', 'opt', 'ema', 'phase', 'epoch', 'best'} <= set(saved)
    assert (saved['phase'], saved['epoch'], saved['ema']['steps']) == (0, 0, 45 // 8)
    assert sorted(p.name for p in (run / 'models').iterdir()) == ['best.pth', 'last.pth']
    assert not (run / 'state.json').exists()
    resume_training()
    train(recipe, colour_folder, run, pretrained=False, resume=True)
    saved = resume_point(run)
    assert (saved['phase'], saved['epoch']) == (1, -1)               # the one phase is done
    assert saved['ema']['steps'] == 2 * (45 // 8)                    # the average went on, not started afresh


def test_ema_and_mixup_cutmix_run_in_train_and_the_ema_is_exported(colour_folder, tmp_path):
    run = tmp_path / 'run'
    train(TINY_CNN.override(ema_decay=0.99, mixup=0.5, cutmix=0.5), colour_folder, run, pretrained=False)
    ema = resume_point(run)['ema']
    assert ema['steps'] == 45 // 8               # one epoch of 45 photos, batch 8: fastai drops the partial batch
    exported = torch.load(export_run(run, tmp_path / 'cnn.pth'), map_location='cpu', weights_only=True)
    for k, v in ema['ema'].items():               # one epoch: the best checkpoint is the EMA after it
        torch.testing.assert_close(exported[k], v)


def test_early_stopping_on_validation_accuracy(colour_folder, tmp_path):
    run = tmp_path / 'run'
    train(TINY_CNN.override(epochs=5, lr=0.0, patience=1), colour_folder, run, pretrained=False)  # nothing improves
    assert list(pd.read_csv(run / 'history.csv').epoch) == [0, 1]


def test_lr_find_saves_its_plot_and_suggests_rates(colour_folder, tmp_path, capsys):
    import train as train_cli
    assert train_cli.main(['cnn', '--lr-find', '--data', str(colour_folder), '--runs', str(tmp_path), '--name', 'lr',
                           '--arch', 'convnextv2_atto', '--size', '32', '--bs', '8', '--no-pretrained',
                           '--valid-pct', '0.25']) == 0
    out = capsys.readouterr().out
    for rule in ('minimum', 'steep', 'valley', 'slide'):
        lr = float(out.split(f'suggested lr ({rule}): ')[1].split()[0])
        assert 1e-7 < lr < 10
    assert (tmp_path / 'lr' / 'lr_find.png').stat().st_size > 1000
    assert not (tmp_path / 'lr' / 'models' / 'best.pth').exists()


def test_recipes_hold_the_seeds_defaults():
    from flowers_fastai.recipes import RECIPES
    cnn, vit = RECIPES['cnn'], RECIPES['vit']
    assert (cnn.arch, cnn.size, cnn.bs, cnn.lr, cnn.lr / cnn.backbone_lr_div, cnn.wd, cnn.label_smoothing) == \
           ('convnextv2_tiny', 224, 32, 1e-3, 2e-4, 0.05, 0.1)
    assert cnn.drop_path > 0 and 30 <= cnn.epochs <= 60 and 2 <= cnn.freeze_epochs <= 5 and cnn.lr_base_bs == 32
    assert 5 <= cnn.warmup_pct * cnn.epochs <= 10                          # 5-10 warmup epochs
    assert (vit.arch, vit.pretrained_tag, vit.size, vit.bs, vit.lr, vit.lr / vit.backbone_lr_div) == \
           ('ViT-L-14-quickgelu', 'openai', 224, 16, 1e-3, 1e-5)
    assert vit.label_smoothing == 0.05 and vit.llrd == 0.75 and 15 <= vit.epochs <= 40 and 0.05 <= vit.warmup_pct <= 0.1
    for r in (cnn, vit):
        assert r.ema_decay == 0.999 and r.patience == 10 and r.randaugment == 2 and r.color_jitter > 0
        assert r.random_erasing > 0 and r.mixup > 0 and r.cutmix > 0 and r.mixup + r.cutmix <= 1


def test_lr_scales_with_batch_warmup_and_accumulation_reach_fit_one_cycle(colour_folder, tmp_path, monkeypatch):
    from fastai.callback.training import GradientAccumulation
    from fastai.learner import Learner
    calls, original = [], Learner.fit_one_cycle

    def spy(self, n_epoch, lr_max=None, *args, **kwargs):
        calls.append((lr_max, kwargs))
        return original(self, n_epoch, lr_max, *args, **kwargs)
    monkeypatch.setattr(Learner, 'fit_one_cycle', spy)
    recipe = TINY_CNN.override(lr=1e-3, lr_base_bs=32, bs=8, accumulate=2, warmup_pct=0.2)
    assert recipe.lr_scale == 0.5                                           # 8 x 2 photos per step / 32
    train(recipe, colour_folder, tmp_path / 'run', pretrained=False)
    (lr, kwargs), = calls
    assert lr == pytest.approx(5e-4) and kwargs['pct_start'] == 0.2
    acc = [cb for cb in kwargs['cbs'] if isinstance(cb, GradientAccumulation)]
    assert len(acc) == 1 and acc[0].n_acc == 16


def test_accelerate_launch_trains_data_parallel_on_two_cpu_processes(colour_folder, tmp_path):
    import shutil
    launcher = shutil.which('accelerate', path=str(REPO / '.venv' / 'bin')) or shutil.which('accelerate')
    if launcher is None:
        pytest.skip('accelerate is not installed')
    cmd = [launcher, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', 'train.py', 'cnn', '--data', str(colour_folder), '--runs', str(tmp_path),
           '--name', 'ddp', '--arch', 'convnextv2_atto', '--size', '32', '--bs', '8', '--epochs', '2',
           '--no-pretrained', '--valid-pct', '0.25']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert 'Data-parallel training over 2 processes (cpu)' in log
    assert '[0/3 ' in log          # 45 training photos, batch 8: 5 batches, shared by two processes (3 each)
    history = pd.read_csv(tmp_path / 'ddp' / 'history.csv')
    assert list(history.epoch) == [0, 1]                                   # one history, from the main process
    metrics = json.loads((tmp_path / 'ddp' / 'metrics.json').read_text())
    assert metrics['n_valid'] == 15                                        # the exact validation set, no padding
    assert load_cnn_model(export_run(tmp_path / 'ddp', tmp_path / 'cnn.pth'))


def test_the_frozen_phase_blocks_field_reads_its_old_name_too():
    """`phase_a_blocks` became `frozen_phase_blocks` (one phase vocabulary): older config.json files, notebooks
    and command lines keep working."""
    from dataclasses import asdict

    import train as train_cli
    from flowers_fastai.recipes import Recipe
    saved = asdict(CNN)
    del saved['frozen_phase_blocks']
    saved['phase_a_blocks'] = 1                                 # a config.json written before the rename
    assert Recipe.from_dict(saved).frozen_phase_blocks == 1
    assert CNN.override(phase_a_blocks=2).frozen_phase_blocks == 2
    assert train_cli.parse_args(['cnn', '--phase-a-blocks', '1']).frozen_phase_blocks == 1
    assert train_cli.parse_args(['cnn', '--frozen-phase-blocks', '1']).frozen_phase_blocks == 1


def test_a_recipe_refuses_a_field_it_does_not_have_and_lists_the_valid_ones():
    from dataclasses import asdict
    from flowers_fastai.recipes import Recipe
    with pytest.raises(TypeError, match=r"no field 'lrr'; valid fields: family, arch, .*\blr\b"):
        CNN.override(lrr=5.0)
    with pytest.raises(TypeError, match="no field 'colour'"):
        Recipe.from_dict({**asdict(CNN), 'colour': 'red'})
    assert CNN.override(phase_a_blocks=1).frozen_phase_blocks == 1   # a renamed field is still read
    assert CNN.override(lr=None) == CNN                              # None: an option left unset


# ----------------------------------------------------------------------------------------- no checkpoint unpickles code
@pytest.mark.parametrize('target', ['models/best.pth', 'models/last.pth'])
def test_crafted_checkpoint_in_a_run_folder_is_refused_and_never_runs(target, cnn_run, colour_folder, tmp_path):
    run = copy_run(cnn_run, tmp_path / 'run')
    if target != 'models/best.pth':
        as_interrupted_after_epoch_0(run)   # before crafting: the position lives in last.pth itself
    marker = tmp_path / 'marker'
    genuine = torch.load(run / target, map_location='cpu', weights_only=False)   # the test's own file
    crafted_torch_file(run / target, marker, genuine if isinstance(genuine, dict) else {})
    with pytest.raises(ValueError) as err:
        if target == 'models/best.pth':
            export_run(run, tmp_path / 'cnn.pth', calibrated=False)
        else:   # --resume: last.pth (weights, optimizer, EMA, position) is loaded at once
            train(TINY_EMA.override(epochs=2), colour_folder, run, pretrained=False, resume=True)
    assert not marker.exists(), 'code in the checkpoint ran'
    assert str(run / target) in str(err.value) and 'refused' in str(err.value)
    assert not (tmp_path / 'cnn.pth').exists()


def test_resume_of_a_vit_lora_run_never_unpickles_a_crafted_last_pth(colour_folder, tmp_path, tiny_clip_name):
    """`--resume` of a ViT LoRA run reads models/last.pth on a path of its own (a LoRA checkpoint may be merged
    first): that path too must refuse a crafted file without running it."""
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
    crafted_torch_file(last, marker, genuine)
    with pytest.raises(ValueError, match='refused'):
        train(recipe, colour_folder, run, pretrained=stand_in, resume=True)
    assert not marker.exists(), 'code in last.pth ran on --resume'


def test_every_torch_load_in_training_resume_and_export_is_weights_only(colour_folder, tmp_path, monkeypatch):
    """Also fastai's internals: SaveModelCallback reloads the best weights with weights_only=False after a fit."""
    calls = torch_load_calls(monkeypatch)
    run = tmp_path / 'run'
    train(TINY_CNN, colour_folder, run, pretrained=False)
    as_interrupted_after_epoch_0(run)
    train(TINY_CNN.override(epochs=2), colour_folder, run, pretrained=False, resume=True)
    export_run(run, tmp_path / 'cnn.pth', calibrated=False)
    assert calls and all(w is True for w in calls), calls


# ------------------------------------------------------------------------------------------ data that cannot train
def test_a_class_emptied_by_the_audit_stops_before_training(tmp_path):
    data = colour_data_folder(tmp_path / 'data')
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
    data = colour_data_folder(tmp_path / 'data', {'rose': 1 if case == 'one photo' else 0})
    if case == 'two copies of one photo':   # one Flickr id: one group, which the grouped split keeps on one side
        for i, suffix in enumerate(('_n', '_m')):
            colour_photo(data / 'rose' / f'7166539842{suffix}.jpg', COLOURS['rose'], seed=900 + i)
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


# ------------------------------------------------------------------------------------------ half-written run folders
RESUME_DAMAGE = {
    'last.pth without a position': ('models/last.pth', lambda p: torch.save({'model': resume_point(p.parent.parent)
                                                                             ['model']}, p)),
    'last.pth whose EMA is not an average': ('models/last.pth', lambda p: torch.save(
        {**resume_point(p.parent.parent), 'ema': {'steps': 3}}, p)),
    'truncated last.pth': ('models/last.pth', truncate_file),
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


def as_killed_during_epoch_0(run: Path) -> None:
    """The run folder as a kill during the first epoch leaves it: config.json, the validation photos and
    history.csv's header; no checkpoint, no epoch logged."""
    shutil.rmtree(run / 'models')
    (run / 'metrics.json').unlink()
    history = run / 'history.csv'
    history.write_text(history.read_text().splitlines()[0] + '\n')


def test_train_cli_resume_of_a_run_killed_during_its_first_epoch_starts_it_over(cnn_run, tmp_path, capsys):
    """scripts/train_or_resume.sh passes --resume to any run folder with a config.json: one killed before its
    first epoch ended has nothing to continue from, and starts over from the settings it recorded."""
    import train as train_cli
    run = copy_run(cnn_run, tmp_path / 'runs' / 'r')
    as_killed_during_epoch_0(run)
    recorded = json.loads((run / 'config.json').read_text())
    assert train_cli.main(['cnn', '--name', 'r', '--runs', str(tmp_path / 'runs'), '--resume']) == 0
    assert 'starting it over' in capsys.readouterr().out
    history = pd.read_csv(run / 'history.csv')
    assert list(history.epoch) == list(range(TINY_EMA.epochs))          # one header, each epoch once
    assert (run / 'metrics.json').exists() and resume_point(run)['epoch'] == -1
    again = json.loads((run / 'config.json').read_text())
    assert again['recipe'] == recorded['recipe'] and again['data'] == recorded['data']


def test_resume_of_a_run_with_an_epoch_logged_but_no_checkpoint_is_refused(cnn_run, colour_folder, tmp_path):
    """Not a run killed early: its work is lost, and starting over would hide that."""
    run = copy_run(cnn_run, tmp_path / 'run')
    as_killed_during_epoch_0(run)
    (run / 'history.csv').write_text((cnn_run / 'history.csv').read_text())
    with pytest.raises(ValueError, match='last.pth'):
        train(TINY_EMA, colour_folder, run, pretrained=False, resume=True)
    assert not (run / 'metrics.json').exists()


def test_train_cli_resume_of_a_truncated_checkpoint_exits_with_one_sentence(cnn_run, tmp_path):
    import train as train_cli
    run = copy_run(cnn_run, tmp_path / 'runs' / 'r')
    as_interrupted_after_epoch_0(run)
    truncate_file(run / 'models' / 'last.pth')
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


# -------------------------------------------------------------------------------- divergence, options that cannot train
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
