"""fastai callbacks of the recipes that fastai does not ship as such: weight EMA and MixUp-or-CutMix per batch."""
from __future__ import annotations

import random

import torch
from fastai.callback.mixup import CutMix, MixUp
from fastai.vision.all import Callback, SaveModelCallback

from .lora import has_lora, merge_lora_state


class MixUpCutMix(MixUp):
    """Per training batch, one of: MixUp (probability `p_mixup`), CutMix (`p_cutmix`), or the batch as it is.

    fastai's `MixUp` and `CutMix` each act on every batch; the seed's recipe draws which one to apply. The loss
    stays fastai's: `lerp` of the loss on both label sets, which with label smoothing is cross-entropy on mixed
    smoothed (soft) targets. Unlike timm's `Mixup`, it needs no even batch size.
    """

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, p_mixup: float = 0.5, p_cutmix: float = 0.5):
        if not (0 <= p_mixup and 0 <= p_cutmix and p_mixup + p_cutmix <= 1):
            raise ValueError(f'p_mixup={p_mixup} and p_cutmix={p_cutmix} must be >= 0 and add up to at most 1')
        super().__init__(mixup_alpha)
        self.cutmix = CutMix(cutmix_alpha)
        self.p_mixup, self.p_cutmix = p_mixup, p_cutmix
        self.last = None  # 'mixup', 'cutmix' or 'none': what the last batch got

    def choose(self, draw: float) -> str:
        """The treatment of a batch for a uniform draw in [0, 1)."""
        if draw < self.p_mixup:
            return 'mixup'
        return 'cutmix' if draw < self.p_mixup + self.p_cutmix else 'none'

    def before_batch(self):
        self.last = self.choose(random.random())
        if self.last == 'mixup':
            super().before_batch()
        elif self.last == 'cutmix':
            self.cutmix.learn, self.cutmix.stack_y = self.learn, self.stack_y
            self.cutmix.before_batch()
            self.lam, self.yb1 = self.cutmix.lam, self.cutmix.yb1
        else:
            self.lam, self.yb1 = torch.ones((), device=self.x.device), self.yb  # lerp(., loss, 1) = loss


class WeightEMA(Callback):
    """An exponential moving average of the weights (timm's `ModelEmaV3`, with warm-up), updated after every
    optimizer step. Validation runs on the EMA weights, so `SaveModelCallback` judges and saves them and the
    exported model is the EMA; the training weights are put back after the epoch's checkpoints are written.

    The default decay 0.999 averages over ~1000 steps (~10 epochs of 100 steps): 0.9998 would barely move in a
    30-epoch run of ~100 steps per epoch. Warm-up makes the early average follow the weights closely.
    """
    order = SaveModelCallback.order + 5   # after_epoch: after the best/last checkpoints were written

    def __init__(self, decay: float = 0.999, warmup: bool = True, lora_alpha: float = 16.0,
                 saved: dict | None = None):
        """`saved`: the average to resume from, as `state()` gave it (the run's resume point holds it)."""
        self.decay, self.warmup, self.lora_alpha, self.saved = decay, warmup, lora_alpha, saved
        self.ema, self.steps, self._training_weights = None, 0, None

    def before_fit(self):
        # One average across phases and resumes. When the model's LoRA updates were merged into its weights
        # (the light full fine-tune), the average is merged the same way and goes on over the merged weights.
        if self.ema is not None and has_lora(self.ema.module) and not has_lora(self.learn.model):
            self._start(self.ema.module.state_dict())
        elif self.ema is None:
            saved, self.saved = self.saved, None
            if saved:
                self.steps = saved['steps']
            self._start(saved['ema'] if saved else None)

    def state(self) -> dict:
        """What a resume needs to go on averaging: the average and its step count."""
        return {'ema': self.ema.module.state_dict(), 'steps': self.steps}

    def _start(self, state: dict | None):
        from timm.utils.model_ema import ModelEmaV3
        self.ema = ModelEmaV3(self.learn.model, decay=self.decay, use_warmup=self.warmup)
        if state is not None:
            if has_lora(state) and not has_lora(self.learn.model):
                state = merge_lora_state(state, self.lora_alpha)
            self.ema.module.load_state_dict(state)

    def after_step(self):
        self.steps += 1
        self.ema.update(self.learn.model, step=self.steps)

    def before_validate(self):
        model = self.learn.model
        self._training_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema.module.state_dict())

    def after_epoch(self):
        if self._training_weights is not None:
            self.learn.model.load_state_dict(self._training_weights)
            self._training_weights = None

    after_cancel_fit = after_epoch


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN or inf: the run stops (train.py prints it as one sentence)."""


class StopOnNonFinite(Callback):
    """Stop a run whose loss or weights turn non-finite, with `TrainingDiverged`: fastai trains on through NaN
    (a --lr 1e4 run ended "successfully" with NaN weights, which export then wrote). The loss is checked at every
    batch, the weights at the end of each epoch's training (before validation and checkpoints)."""
    order = SaveModelCallback.order - 5   # after_train: before any checkpoint of the epoch is written

    def after_loss(self):
        if self.training and not torch.isfinite(self.learn.loss).all():
            self._stop(f'the training loss became {float(self.learn.loss.detach().float().mean())}')

    def after_train(self):
        for name, p in self.learn.model.named_parameters():
            if not torch.isfinite(p).all():
                self._stop(f'the weight {name} holds NaN or inf values')

    def _stop(self, what: str):
        raise TrainingDiverged(f'training diverged: {what} in epoch {self.epoch + 1}; nothing from this epoch on was '
                               'saved: train again with a lower --lr (or without --half / the changed setting)')
