"""The fastai callbacks of the training loop that fastai does not ship as such: weight EMA, MixUp-or-CutMix per batch,
stopping on NaN, the run's checkpoints and history, accuracy per data folder, knowledge distillation, and the
state a Learner of this project carries between its phases (its recipe, its DataLoaders at another size)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.mixup import CutMix, MixHandler, MixUp
from fastai.torch_core import rank_distrib
from fastai.vision.all import (Callback, CSVLogger, EarlyStoppingCallback, Learner, Metric, SaveModelCallback)
from torch import nn

from .checkpoints import BEST, restore_checkpoint, save_checkpoint, save_resume_point
from .distill import Teacher, ensemble_log_probs, feature_loss, kd_loss_to
from .run_folder import DISTILL_HEAD
from .lora import has_lora, merge_lora_state
from .recipes import Recipe
from .teachers import classifier_of


class MixUpCutMix(MixUp):
    """Per training batch, one of: MixUp (probability `p_mixup`), CutMix (`p_cutmix`), or the batch as it is.

    fastai's `MixUp` and `CutMix` each act on every batch; the brief's recipe draws which one to apply. The loss
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


def _skipped(learn: Learner) -> bool:
    """True after an epoch that fastai's `start_epoch` skipped on resume (it records an empty row)."""
    return not learn.recorder.values or not len(learn.recorder.values[-1])


class BestCheckpoint(SaveModelCallback):
    """SaveModelCallback on validation accuracy that ignores the epochs skipped on resume."""

    def __init__(self, best: float | None = None, recipe: Recipe | None = None):
        super().__init__(monitor='accuracy', fname=BEST, reset_on_fit=False)
        self.best, self.recipe = best, recipe

    def after_epoch(self):
        if not _skipped(self.learn):
            super().after_epoch()

    def _save(self, name):
        if not rank_distrib():   # atomically: an interrupted write never leaves a truncated best.pth
            self.last_saved_path = save_checkpoint(self.learn, name, with_opt=self.with_opt)

    def after_fit(self, **kwargs):
        # fastai's after_fit reloads the best weights with torch.load(weights_only=False), which runs the code
        # of a crafted best.pth: the same reload here, read with weights_only=True (and across a LoRA merge).
        restore_checkpoint(self.learn, self.fname, self.recipe, with_opt=False)


class EarlyStopping(EarlyStoppingCallback):
    """fastai's EarlyStoppingCallback on validation accuracy, ignoring the epochs skipped on resume."""

    def __init__(self, patience: int):
        super().__init__(monitor='accuracy', comp=np.greater, patience=patience)

    def after_epoch(self):
        if not _skipped(self.learn):
            super().after_epoch()


class HistoryCSV(CSVLogger):
    """fastai's CSVLogger, with a `phase` column and one header for the whole run (phases and resumes
    append to the same file)."""

    def __init__(self, phase: str, fname='history.csv'):
        super().__init__(fname, append=True)
        self.phase = phase

    def before_fit(self):
        if hasattr(self, 'gather_preds') or rank_distrib():   # one history, written by the main process
            self.run = False
            return
        path = self.path / self.fname
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open('a')
        if new:
            self.file.write(','.join(['phase', *self.recorder.metric_names]) + '\n')
        self.old_logger, self.learn.logger = self.logger, self._write_line

    def _write_line(self, log):
        if _skipped(self.learn):
            return self.old_logger(log)
        self.file.write(','.join([self.phase, *map(str, log)]) + '\n')
        self.file.flush()
        self.old_logger(log)


class ResumableCheckpoint(Callback):
    """After every epoch, the run's one resume point, models/last.pth: weights, optimizer, weight EMA and the
    position (phase, epoch, best accuracy so far), so that `--resume` continues an interrupted run from its last
    finished epoch. fastai's `SaveModelCallback(every_epoch=True, with_opt=True)` writes one file per epoch with
    weights and optimizer only; a single rolling file that also holds the EMA and the position needs this."""
    order = WeightEMA.order + 1   # after the EMA put the training weights back: those are what resume needs

    def __init__(self, phase_index: int, tracker: BestCheckpoint, ema: WeightEMA | None = None):
        self.phase_index, self.tracker, self.ema = phase_index, tracker, ema

    def after_epoch(self):
        if _skipped(self.learn) or rank_distrib():
            return
        save_resume_point(self.learn, self.phase_index, self.epoch, self.tracker.best,
                          self.ema.state() if self.ema else None)


# A fastai Metric rather than a Callback, but the Recorder drives it batch by batch as one; here and not in
# metrics.py, which stays free of fastai for the delivery side.
class FolderAccuracy(Metric):
    """Validation accuracy on the photos of one data folder, for runs on several folders: the first folder's is
    the number comparable with runs on that folder alone (`split_photos` gives it the same split). fastai's
    metrics see predictions and targets only; the folder of each validation photo comes from the validation
    DataLoader's items, which it reads in order (it never shuffles)."""

    def __init__(self, source: int, name: str):
        self.source, self._name = source, f'accuracy_{name}'

    @property
    def name(self):
        return self._name

    def reset(self):
        self.seen = self.correct = self.total = 0

    def accumulate(self, learn):
        n = len(learn.y)
        sources = torch.tensor(learn.dl.items['source'].to_numpy()[self.seen:self.seen + n])
        self.seen += n
        mine = (sources == self.source).to(learn.y.device)
        self.correct += int(((learn.pred.argmax(-1) == learn.y) & mine).sum())
        self.total += int(mine.sum())

    @property
    def value(self):
        return self.correct / self.total if self.total else None


def folder_metrics(names: list[str]) -> list[FolderAccuracy]:
    """One accuracy per data folder when there are several (none for one: `accuracy` is that folder's)."""
    return [FolderAccuracy(k, name) for k, name in enumerate(names)] if len(names) > 1 else []


class _PooledFeatures:
    """Keeps the input of a model's classifier (its pooled features) from the last forward pass."""

    def __init__(self, model: nn.Module):
        self.value = None
        self.handle = classifier_of(model).register_forward_pre_hook(self._keep)

    def _keep(self, module, inputs):
        self.value = inputs[0]

    def remove(self):
        self.handle.remove()


class Distillation(Callback):
    """Distil `teachers` into the learner's model during training (validation is left untouched); several teachers
    teach their averaged probabilities at the distillation temperature.

    `student_stats`: the (mean, std) the student's input is normalised with; each teacher's input is the
    student's batch, un-normalised and normalised again with its own statistics, resized to its own size when
    it has one (a lower resolution makes the teacher's forward cheaper; a higher one may suit it better)."""
    order = MixHandler.order + 1   # before_batch after MixUp / CutMix: the teacher sees the mixed batch
    run_valid = False
    channels_last = True   # on CPU, teachers run channels_last: oneDNN's convolutions are 1.4-1.5x faster so

    def __init__(self, teachers: Teacher | list[Teacher], student_stats, alpha: float = 0.5,
                 temperature: float = 1.0, feature_weight: float = 0.0):
        teachers = [teachers] if isinstance(teachers, Teacher) else list(teachers)
        if not teachers:
            raise ValueError('distillation needs at least one teacher')
        if not 0 <= alpha <= 1:
            raise ValueError(f'distill alpha must be in [0, 1], not {alpha}')
        if temperature <= 0:
            raise ValueError(f'distill temperature must be positive, not {temperature}')
        if feature_weight and len(teachers) > 1:
            raise ValueError('feature distillation matches one teacher\'s features: give one teacher, or '
                             'distill_features 0 for an ensemble')
        self.teachers, self.alpha, self.temperature = teachers, alpha, temperature
        self.feature_weight = feature_weight
        self.student_stats = [torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in student_stats]
        self.target = self.teacher_input = None

    @property
    def teacher(self) -> nn.Module:
        """The first teacher's network (the one feature distillation matches)."""
        return self.teachers[0].model

    def before_fit(self):
        device = self.dls.device
        for teacher in self.teachers:
            teacher.model.to(device).eval().requires_grad_(False)
            if self._channels_last(device):   # docs/speed.md, "Training step"
                teacher.model.to(memory_format=torch.channels_last)
        self.student_stats = [s.to(device) for s in self.student_stats]
        self.teacher_stats = [[torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                               for v in (t.mean, t.std)] for t in self.teachers]   # once, not per batch
        self.hooks = None
        if self.feature_weight:
            if not hasattr(self.learn.model, DISTILL_HEAD):
                raise ValueError('feature distillation needs the student built with attach_distill_head')
            self.hooks = (_PooledFeatures(self.learn.model), _PooledFeatures(self.teacher))

    def _teacher_view(self, x: torch.Tensor, teacher: Teacher, stats) -> torch.Tensor:
        (s_mean, s_std), (t_mean, t_std) = self.student_stats, stats
        x = (x.float() * s_std + s_mean - t_mean) / t_std
        if teacher.size and teacher.size != x.shape[-1]:
            x = F.interpolate(x, size=(teacher.size, teacher.size), mode='bilinear', antialias=True,
                              align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last(x.device) else x

    def _channels_last(self, device) -> bool:
        return self.channels_last and torch.device(device).type == 'cpu'

    def before_batch(self):
        logits = []
        with torch.no_grad():
            for teacher, stats in zip(self.teachers, self.teacher_stats):
                self.teacher_input = self._teacher_view(self.xb[0], teacher, stats)
                logits.append(teacher.model(self.teacher_input))
            self.target = ensemble_log_probs(logits, self.temperature)

    def after_loss(self):
        loss = self.alpha * kd_loss_to(self.pred, self.target, self.temperature)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * self.learn.loss_grad
        if self.hooks:
            student_features, teacher_features = (h.value for h in self.hooks)
            projected = getattr(self.learn.model, DISTILL_HEAD)(student_features)
            loss = loss + self.feature_weight * feature_loss(projected, teacher_features)
        self.learn.loss_grad = loss
        self.learn.loss = loss.detach().clone()

    def after_fit(self):
        if self.hooks:
            for hook in self.hooks:
                hook.remove()
            self.hooks = None


class RunRecipe(Callback):
    """What `learn.fit_recipe()` (flowers_fastai/notebook.py) trains: the run's recipe, its starting weights
    (`pretrained`: True, a file, or False) and what config.json records (`config`), carried by the Learner that
    `training.prepare_learner` builds; fastai exposes it as `learn.run_recipe`. It acts on no event: the Learner
    holds the run's state in a callback, as fastai's Learners do, rather than in attributes set on it."""

    def __init__(self, recipe: Recipe, pretrained: bool | str | Path, config: dict):
        self.recipe, self.pretrained, self.config = recipe, pretrained, config


class ProgressiveResize(Callback):
    """The Learner's DataLoaders at the size a phase trains at (progressive resizing, the recipe's
    `resize_epochs`): how to build them at a size (`dataloaders_at`) and the size they are at (`dls_size`),
    carried by the Learner across its phases as `learn.progressive_resize`. It acts on no event: the training
    glue calls `resize` between phases, before the phase's `fit_one_cycle`."""

    def __init__(self, dataloaders_at: Callable, dls_size: int):
        self.dataloaders_at, self.dls_size = dataloaders_at, dls_size

    def resize(self, size: int) -> bool:
        """Give the Learner its DataLoaders at `size`; False when they are at that size already."""
        if size == self.dls_size:
            return False
        self.learn.dls, self.dls_size = self.dataloaders_at(size), size
        return True
