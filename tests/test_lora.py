"""LoRA on the CLIP tower: starts as the original model, trains only the low-rank updates, merges to the same
outputs, and exports as a plain state_dict that `submit` loads."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from flowers_fastai.architectures import ClipClassifier, clip_spec_from_open_clip
from flowers_fastai.lora import TARGETS, apply_lora, is_lora_parameter, merge_lora
from flowers_fastai.preprocess import load_for_model
from flowers_fastai.recipes import VIT

from .helpers import PLAIN, StageSpy, fastai_logits, resume_point


@pytest.fixture
def tiny_model(tiny_clip_name):
    torch.manual_seed(0)
    return ClipClassifier(clip_spec_from_open_clip(tiny_clip_name)).eval()


def test_lora_starts_as_the_original_trains_only_updates_and_merges_to_the_same_outputs(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    plain_keys = list(tiny_model.state_dict())
    before = tiny_model(x)
    trainable = apply_lora(tiny_model.visual, rank=4, alpha=8)
    assert len(trainable) == 2 * len(TARGETS) * len(tiny_model.visual.transformer.resblocks)
    torch.testing.assert_close(tiny_model(x), before)                    # B = 0: nothing changed yet
    assert {n for n, p in tiny_model.visual.named_parameters() if p.requires_grad} == \
           {n for n, _ in tiny_model.visual.named_parameters() if is_lora_parameter(n)}
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.2)
    adapted = tiny_model(x)
    assert not torch.allclose(adapted, before, atol=1e-3)               # the updates act on the output
    merge_lora(tiny_model)
    torch.testing.assert_close(tiny_model(x), adapted, atol=1e-5, rtol=0)
    assert sorted(tiny_model.state_dict()) == sorted(plain_keys)        # plain open_clip layout again


def test_lora_training_keeps_the_tower_and_exports_a_merged_plain_file(colour_folder, tmp_path,
                                                                        tiny_clip_name):
    import open_clip
    from flowers_fastai.exporting import export_run
    from flowers_fastai.submit import load_vit_model
    from flowers_fastai.training import train
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name, pretrained=None)
    stand_in = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(clip.state_dict(), stand_in)
    recipe = VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, freeze_epochs=1, unfreeze_blocks=0,
                          lora_rank=2, lr=1e-2, backbone_lr_div=1.0, valid_pct=0.25, **PLAIN)
    recipe = recipe.override(ema_decay=0.9)   # the EMA of a LoRA model is what gets exported
    learn = train(recipe, colour_folder, tmp_path / 'run', pretrained=stand_in)
    assert list(pd.read_csv(tmp_path / 'run' / 'history.csv').phase) == ['frozen', 'full']
    tower = dict(learn.model.visual.named_parameters())
    for name, original in clip.visual.state_dict().items():             # the pretrained tower never moved
        key = next(k for k in (name, name.replace('in_proj_weight', 'parametrizations.in_proj_weight.original')
                               .replace('.weight', '.parametrizations.weight.original')) if k in tower)
        assert torch.equal(tower[key].detach(), original), name
    assert any(p.abs().sum() > 0 for n, p in tower.items() if n.endswith('.B'))   # the updates did

    out = export_run(tmp_path / 'run', tmp_path / 'vit_flowers.pth')
    state = torch.load(out, map_location='cpu', weights_only=True)
    assert list(state) == list(ClipClassifier(clip_spec_from_open_clip(tiny_clip_name)).state_dict())
    model = load_vit_model(out)
    photo = next(iter(colour_folder.glob('tulip/*.jpg')))
    torch.testing.assert_close(model(load_for_model(photo, model.flowers_preprocessing))[0],
                               fastai_logits(learn, [photo])[0], atol=1e-5, rtol=0)


def test_merging_a_lora_checkpoint_without_its_model_gives_the_merged_models_weights(tiny_model):
    from flowers_fastai.lora import has_lora, merge_lora_state
    apply_lora(tiny_model.visual, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if is_lora_parameter(name):
                p.normal_(0, 0.2)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    assert has_lora(state) and has_lora(tiny_model)
    merged = merge_lora_state(state, alpha=8)
    expected = merge_lora(tiny_model).state_dict()
    assert not has_lora(merged) and sorted(merged) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)


def _lora_then_full_recipe(tiny_clip_name, **changes):
    return VIT.override(arch=tiny_clip_name, size=32, bs=8, epochs=1, freeze_epochs=1, final_epochs=1,
                        unfreeze_blocks=0, lora_rank=2, lr=1e-2, backbone_lr_div=1.0, valid_pct=0.25,
                        **PLAIN).override(ema_decay=0.9, **changes)


def _stand_in_clip(tiny_clip_name, tmp_path):
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model(tiny_clip_name, pretrained=None)
    stand_in = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(clip.state_dict(), stand_in)
    return clip, stand_in


def test_lora_then_light_full_fine_tune_merges_trains_every_weight_and_exports(colour_folder, tmp_path,
                                                                                tiny_clip_name, monkeypatch):
    from flowers_fastai import training
    from flowers_fastai.exporting import export_run
    from flowers_fastai.lora import has_lora
    from flowers_fastai.submit import load_vit_model

    clip, stand_in = _stand_in_clip(tiny_clip_name, tmp_path)
    spy, make = StageSpy(), training.make_learner
    monkeypatch.setattr(training, 'make_learner', lambda *a, **k: make(*a, **k).add_cb(spy.callback()))
    learn = training.train(_lora_then_full_recipe(tiny_clip_name), colour_folder, tmp_path / 'run', pretrained=stand_in)
    assert list(pd.read_csv(tmp_path / 'run' / 'history.csv').phase) == ['frozen', 'full', 'final']

    probe, lora, final = spy.phases
    n_blocks = len(clip.visual.transformer.resblocks)
    assert len(lora['trains']) == n_blocks + 1 and all(lora['trains'])  # LoRA: only each block's updates + head
    assert len(final['trains']) == n_blocks + 2 and all(final['trains'])  # merged: the embeddings group is back
    assert not has_lora(learn.model)
    # weights LoRA never touches (patch embedding, layer norms) moved in the light full fine-tune
    tower = learn.model.visual.state_dict()
    assert not torch.equal(tower['conv1.weight'], clip.visual.state_dict()['conv1.weight'])
    ema = resume_point(tmp_path / 'run')['ema']
    assert not has_lora(ema['ema']) and sorted(ema['ema']) == sorted(learn.model.state_dict())

    out = export_run(tmp_path / 'run', tmp_path / 'vit_flowers.pth')
    model = load_vit_model(out)
    photo = next(iter(colour_folder.glob('daisy/*.jpg')))
    torch.testing.assert_close(model(load_for_model(photo, model.flowers_preprocessing))[0],
                               fastai_logits(learn, [photo])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('crash_at', [(1, 0), (2, 0)], ids=['end-of-lora-phase', 'inside-full-fine-tune'])
def test_lora_run_resumes_across_the_merge(colour_folder, tmp_path, tiny_clip_name, monkeypatch, crash_at):
    from flowers_fastai.exporting import export_run
    from flowers_fastai.lora import has_lora
    from flowers_fastai.submit import load_vit_model
    from flowers_fastai.callbacks import ResumableCheckpoint
    from flowers_fastai.training import train
    _, stand_in = _stand_in_clip(tiny_clip_name, tmp_path)
    recipe = _lora_then_full_recipe(tiny_clip_name, final_epochs=2)
    original = ResumableCheckpoint.after_epoch

    def crash(self):
        original(self)
        if (self.phase_index, self.epoch) == crash_at:
            raise KeyboardInterrupt('simulated interruption')
    monkeypatch.setattr(ResumableCheckpoint, 'after_epoch', crash)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, colour_folder, tmp_path / 'run', pretrained=stand_in)
    monkeypatch.setattr(ResumableCheckpoint, 'after_epoch', original)

    learn = train(recipe, colour_folder, tmp_path / 'run', pretrained=stand_in, resume=True)
    history = pd.read_csv(tmp_path / 'run' / 'history.csv')
    assert list(zip(history.phase, history.epoch)) == [('frozen', 0), ('full', 0), ('final', 0), ('final', 1)]
    assert not has_lora(learn.model)
    model = load_vit_model(export_run(tmp_path / 'run', tmp_path / 'vit_flowers.pth'))
    photo = next(iter(colour_folder.glob('rose/*.jpg')))
    torch.testing.assert_close(model(load_for_model(photo, model.flowers_preprocessing))[0],
                               fastai_logits(learn, [photo])[0], atol=1e-5, rtol=0)
