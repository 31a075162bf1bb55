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

from .test_training import PLAIN, _fastai_logits, colour_folder  # noqa: F401  (module-scoped fixture)


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


def test_lora_training_keeps_the_tower_and_exports_a_merged_plain_file(colour_folder, tmp_path,  # noqa: F811
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
                               _fastai_logits(learn, [photo])[0], atol=1e-5, rtol=0)
