"""The recipe callbacks on a tiny synthetic fastai Learner: MixUp-or-CutMix per batch, and weight EMA."""
from __future__ import annotations

import random

import pytest
import torch
from fastai.vision.all import (Callback, CrossEntropyLossFlat, Datasets, ItemGetter, Learner, SaveModelCallback,
                               accuracy)
from torch import nn
from torch.nn import functional as F

from flowers_fastai.callbacks import MixUpCutMix, WeightEMA


def tiny_learner(tmp_path, cbs=(), n=64, bs=16):
    torch.manual_seed(0)
    items = [(torch.randn(3, 8, 8) + (i % 5), i % 5) for i in range(n)]
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(48)), list(range(48, n))])
    dls = dsets.dataloaders(bs=bs, shuffle=True, drop_last=False, num_workers=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(label_smoothing=0.1), metrics=accuracy,
                   path=tmp_path, cbs=list(cbs))


class Spy(Callback):
    """Records, per training batch, the input before and after the mixing callback and the loss."""
    order = 5  # after MixUpCutMix (order 0), before the model

    def __init__(self, mix):
        self.mix, self.records = mix, []

    def before_batch(self):
        if self.training:
            self.records.append({'kind': self.mix.last, 'x': self.learn.xb[0].clone(), 'y': self.learn.yb[0].clone(),
                                 'lam': self.mix.lam, 'y1': self.mix.yb1[0].clone()})

    def after_loss(self):
        if self.training:
            self.records[-1]['loss'] = self.learn.loss.detach().clone()
            self.records[-1]['pred'] = self.learn.pred.detach().clone()


def smoothed_ce(pred, y, eps=0.1):
    return F.cross_entropy(pred, y, label_smoothing=eps, reduction='none')


def test_mixup_cutmix_draws_each_kind_with_its_probability():
    mix = MixUpCutMix(p_mixup=0.3, p_cutmix=0.2)
    assert [mix.choose(d) for d in (0.0, 0.299, 0.3, 0.499, 0.5, 0.999)] == \
           ['mixup', 'mixup', 'cutmix', 'cutmix', 'none', 'none']
    random.seed(0)
    kinds = [mix.choose(random.random()) for _ in range(4000)]
    assert abs(kinds.count('mixup') / 4000 - 0.3) < 0.03 and abs(kinds.count('cutmix') / 4000 - 0.2) < 0.03
    assert MixUpCutMix(p_mixup=0.0, p_cutmix=0.0).choose(0.0) == 'none'
    with pytest.raises(ValueError):
        MixUpCutMix(p_mixup=0.7, p_cutmix=0.5)


@pytest.mark.parametrize('p_mixup, p_cutmix, kind', [(1.0, 0.0, 'mixup'), (0.0, 1.0, 'cutmix'), (0.0, 0.0, 'none')])
def test_each_kind_mixes_the_batch_and_the_loss_uses_soft_targets(tmp_path, p_mixup, p_cutmix, kind):
    mix = MixUpCutMix(p_mixup=p_mixup, p_cutmix=p_cutmix)
    spy = Spy(mix)
    learn = tiny_learner(tmp_path, cbs=[mix, spy])
    originals = {}

    class Before(Callback):
        order = -5  # before the mixing

        def before_batch(self):
            if self.training:
                originals[len(originals)] = self.learn.xb[0].clone()
    learn.fit(1, lr=1e-3, cbs=[Before()])
    assert spy.records and all(r['kind'] == kind for r in spy.records)
    for i, r in enumerate(spy.records):
        x0, lam = originals[i], r['lam']
        per_sample = torch.lerp(smoothed_ce(r['pred'], r['y1']), smoothed_ce(r['pred'], r['y']), lam)
        torch.testing.assert_close(r['loss'], per_sample.mean(), atol=1e-5, rtol=1e-5)
        if kind == 'none':
            assert torch.equal(r['x'], x0) and float(lam) == 1.0
        elif kind == 'mixup':
            assert not torch.equal(r['x'], x0) and ((0.5 <= lam) & (lam <= 1)).all()
        else:  # a rectangle of the batch was pasted from other photos; lam is the area kept
            changed = (r['x'] != x0).any(dim=(0, 1))
            assert 0 < changed.float().mean() <= 1 - float(lam) + 1e-6
    assert learn.loss_func.__class__.__name__ == 'CrossEntropyLossFlat'  # the plain loss is back after training


def test_ema_weights_are_validated_saved_and_loaded_at_the_end(tmp_path):
    ema = WeightEMA(decay=0.9)
    learn = tiny_learner(tmp_path)

    class Capture(Callback):
        order = WeightEMA.order + 1

        def after_epoch(self):
            self.training_weights = {k: v.clone() for k, v in self.learn.model.state_dict().items()}
            self.ema_weights = {k: v.clone() for k, v in ema.ema.module.state_dict().items()}
    capture = Capture()
    tracker = SaveModelCallback(monitor='accuracy', fname='best', every_epoch=True)  # keep every epoch's file
    learn.fit(2, lr=1e-2, cbs=[tracker, ema, capture])
    saved = torch.load(tmp_path / 'models' / 'best_1.pth', map_location='cpu', weights_only=True)
    for k, v in saved.items():
        torch.testing.assert_close(v, capture.ema_weights[k])                  # the EMA was saved...
    assert any(not torch.equal(v, capture.training_weights[k]) for k, v in saved.items())  # ...not the raw weights
    for k, v in learn.model.state_dict().items():                              # training resumes on the raw weights
        assert torch.equal(v, capture.training_weights[k])
    # the validation loss the recorder logged is the EMA model's
    ema.ema.module.eval()
    with torch.no_grad():
        xs, ys = zip(*[(x, y) for x, y in learn.dls.valid])
        losses = [CrossEntropyLossFlat(label_smoothing=0.1)(ema.ema.module(x), y) * len(y) for x, y in zip(xs, ys)]
    assert float(sum(losses) / sum(len(y) for y in ys)) == pytest.approx(learn.recorder.values[-1][1], abs=1e-5)
    assert ema.steps == 6 and ema.state()['steps'] == 6                       # what a resume point keeps
    for k, v in ema.state()['ema'].items():
        torch.testing.assert_close(v, capture.ema_weights[k])


def test_ema_default_decay_warms_up_and_is_capped(tmp_path):
    ema = WeightEMA()                       # the defaults the recipes use
    ema.learn = tiny_learner(tmp_path)
    ema.before_fit()
    decays = [ema.ema.get_decay(step) for step in (1, 2, 10, 100, 10_000, 1_000_000)]
    assert decays[0] == 0.0 and decays == sorted(decays) and decays[-1] == 0.999
    assert decays[3] < 0.97   # after 100 steps (~1 epoch) the average still follows the weights
