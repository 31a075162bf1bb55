"""Training glue: a run folder, a fastai Learner, the fine-tuning phases, resume, data-parallel training, and the
run's reports."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import num_distrib, rank_distrib
from fastai.vision.all import (Adam, Callback, ClassificationInterpretation, CrossEntropyLossFlat, CSVLogger,
                               EarlyStoppingCallback, GradientAccumulation, GradientClip, Learner, SaveModelCallback,
                               accuracy, default_device, set_seed)

from .architectures import ClipClassifier
from .audit import audit_items
from .callbacks import MixUpCutMix, WeightEMA
from .data import flower_dataloaders, scan_image_folder, stratified_split
from .exporting import VALID_ITEMS
from .labels import CLASSES
from .lora import has_lora, merge_lora, merge_lora_state
from .models import SPLITTERS, create_model, layerwise_lrs
from .preprocess import cnn_preprocessing, vit_preprocessing
from .recipes import Recipe

BEST, LAST = 'best', 'last'   # checkpoint names under <run>/models/


def preprocessing_for(recipe: Recipe):
    return (cnn_preprocessing if recipe.family == 'cnn' else vit_preprocessing)(recipe.size)


def _skipped(learn: Learner) -> bool:
    """True after an epoch that fastai's `start_epoch` skipped on resume (it records an empty row)."""
    return not learn.recorder.values or not len(learn.recorder.values[-1])


class BestCheckpoint(SaveModelCallback):
    """SaveModelCallback on validation accuracy that ignores the epochs skipped on resume."""

    def __init__(self, best: float | None = None):
        super().__init__(monitor='accuracy', fname=BEST, reset_on_fit=False)
        self.best = best

    def after_epoch(self):
        if not _skipped(self.learn):
            super().after_epoch()


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
    """After every epoch: weights + optimizer to models/last.pth and the position to state.json, so that
    `--resume` continues an interrupted run from its last finished epoch. (SaveModelCallback keeps either
    the best or one file per epoch; a single rolling resume point needs this.)"""
    order = WeightEMA.order + 1   # after the EMA put the training weights back: those are what resume needs

    def __init__(self, state_path: Path, phase_index: int, tracker: BestCheckpoint):
        self.state_path, self.phase_index, self.tracker = state_path, phase_index, tracker

    def after_epoch(self):
        if _skipped(self.learn) or rank_distrib():
            return
        self.learn.save(LAST, with_opt=True)
        self.state_path.write_text(json.dumps(
            {'phase': self.phase_index, 'epoch': self.epoch, 'best': float(self.tracker.best)}))


def make_learner(recipe: Recipe, dls, model, run_dir: Path) -> Learner:
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(label_smoothing=recipe.label_smoothing),
                    opt_func=Adam,  # fastai's Adam with decoupled weight decay: AdamW
                    wd=recipe.wd, metrics=accuracy, splitter=SPLITTERS[recipe.family],
                    path=run_dir, model_dir='models', cbs=[GradientClip(1.0)],
                    train_bn=False)  # frozen means frozen: no norm layer trains in a linear probe
    if default_device().type == 'cuda':
        learn.to_fp16()  # AMP on GPU only: bf16/fp16 on this kind of CPU is slower than fp32
    return learn


def _phases(recipe: Recipe, pretrained) -> list[dict]:
    """fastai's `fine_tune` as explicit phases over the splitter's groups (bottom ... top block, head):
    (A) the head (+ `phase_a_blocks` top blocks) with the rest frozen, (B) the top `unfreeze_blocks` blocks or
    everything, (C, optional) everything at LRs / `final_lr_div`; with LoRA, phase C is the seed's "light full
    fine-tune": the updates are merged into the weights, which all train from there. LRs fall by `llrd` per
    block from the top (layer-wise LR decay, see `_phase_lrs`). `trainable`: how many groups from the top train
    (None: all). From scratch there is nothing to protect: one phase, everything at one LR."""
    if not pretrained:
        return [dict(name='scratch', epochs=recipe.epochs, trainable=None, lr_div=None)]
    phases = [dict(name='frozen', epochs=recipe.freeze_epochs, trainable=1 + recipe.phase_a_blocks, lr_div=1.0),
              dict(name='partial' if recipe.unfreeze_blocks else 'full', epochs=recipe.epochs,
                   trainable=1 + recipe.unfreeze_blocks if recipe.unfreeze_blocks else None, lr_div=1.0),
              dict(name='final', epochs=recipe.final_epochs, trainable=None, lr_div=recipe.final_lr_div,
                   merge_lora=bool(recipe.lora_rank))]
    return [phase for phase in phases if phase['epochs']]


def _phase_lrs(learn: Learner, recipe: Recipe, phase: dict):
    """The phase's LR per parameter group of the model as it is now (merging LoRA adds the embedding group)."""
    head_lr = recipe.lr * recipe.lr_scale
    if phase['lr_div'] is None:
        return head_lr
    n_groups = len(learn.splitter(learn.model))
    return layerwise_lrs(n_groups, head_lr, head_lr / recipe.backbone_lr_div, recipe.llrd) / phase['lr_div']


def _load_checkpoint(learn: Learner, name: str, recipe: Recipe, with_opt: bool) -> None:
    """fastai's `learn.load`, also across a LoRA merge: a merged checkpoint (saved during the light full
    fine-tune) makes a LoRA model merge first; a LoRA checkpoint for a merged model (a best epoch from before
    the merge) is merged on the fly, without optimizer state, which belonged to the LoRA updates."""
    if recipe.lora_rank:
        saved = torch.load(learn.path / learn.model_dir / f'{name}.pth', map_location='cpu',
                           weights_only=False)   # our own checkpoint: fastai pickles its optimizer state with L
        state = saved.get('model', saved)
        if has_lora(learn.model) and not has_lora(state):
            merge_lora(learn.model)
            learn.opt = None   # fastai's load builds it again, over the merged weights
        elif has_lora(state) and not has_lora(learn.model):
            learn.model.load_state_dict(merge_lora_state(state, recipe.lora_alpha))
            return
    learn.load(name, with_opt=with_opt)


def _set_trainable(learn: Learner, trainable: int | None) -> None:
    n_groups = len(learn.splitter(learn.model))
    if trainable is None or trainable >= n_groups:
        learn.unfreeze()
    else:
        learn.freeze_to(-trainable)


def prepare_learner(recipe: Recipe, data_dir: str | Path, run_dir: str | Path, pretrained: bool | str | Path = True,
                    split: str = 'grouped', num_workers: int = 0, limit_items: int | None = None):
    """Seeded data, split, model and fastai Learner for `recipe`; returns (learn, config) where `config` is what
    config.json records. `split`: 'grouped' audits the photos first (audit.py): copies of one photo stay on one
    side and photos filed under two classes are left out; 'stratified' splits photos independently."""
    set_seed(recipe.seed, reproducible=False)
    scanned = scan_image_folder(data_dir)
    items = scanned.items if limit_items is None else _stratified_subset(scanned.items, limit_items, recipe.seed)
    groups, left_out = None, 0
    if split == 'grouped':
        audit = audit_items(items)
        kept = audit.kept()
        left_out = len(items) - len(kept)
        print(audit.report().splitlines()[0])
        items, groups = [items[i] for i in kept], audit.group[kept]
    elif split != 'stratified':
        raise ValueError(f'split must be "grouped" or "stratified", not {split!r}')
    pp = preprocessing_for(recipe)
    dls = flower_dataloaders(items, pp, bs=recipe.bs, valid_pct=recipe.valid_pct, seed=recipe.seed,
                             num_workers=num_workers, min_scale=recipe.min_scale, groups=groups,
                             randaugment=recipe.randaugment, randaugment_magnitude=recipe.randaugment_magnitude,
                             color_jitter=recipe.color_jitter, random_erasing=recipe.random_erasing)
    model = create_model(recipe, pretrained=pretrained)
    learn = make_learner(recipe, dls, model, Path(run_dir))
    config = {'recipe': asdict(recipe), 'preprocessing': asdict(pp), 'classes': CLASSES,
              'data': str(Path(data_dir).resolve()), 'split': split, 'left_out_filed_under_two_classes': left_out,
              'n_train': len(dls.train_ds), 'n_valid': len(dls.valid_ds),
              'pretrained': str(pretrained) if pretrained else False, 'torch': torch.__version__}
    if isinstance(model, ClipClassifier):
        config['clip_spec'] = model.spec.to_dict()
    return learn, config


def train(recipe: Recipe, data_dir: str | Path, run_dir: str | Path, pretrained: bool | str | Path = True,
          resume: bool = False, num_workers: int = 0, limit_items: int | None = None,
          split: str = 'grouped') -> Learner:
    """Train one model into `run_dir`: models/best.pth (best validation accuracy), history.csv,
    confusion_matrix.{csv,png}, config.json, metrics.json. Returns the Learner holding the best weights.
    With `resume`, the run continues after its last finished epoch, on the split it was started with."""
    run_dir = Path(run_dir)
    state_path = run_dir / 'state.json'
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f'nothing to resume in {run_dir} (no state.json)')
        split = json.loads((run_dir / 'config.json').read_text()).get('split', 'stratified')  # older runs: stratified
    elif (run_dir / 'models').exists():
        raise FileExistsError(f'{run_dir} already holds a run: pass --resume to continue it, or another --name')
    run_dir.mkdir(parents=True, exist_ok=True)
    learn, config = prepare_learner(recipe, data_dir, run_dir, pretrained=False if resume else pretrained,
                                    split=split, num_workers=num_workers, limit_items=limit_items)
    main_process = rank_distrib() == 0   # under `accelerate launch`, only the main process writes files
    if not resume and main_process:
        (run_dir / 'config.json').write_text(json.dumps(config, indent=2))
        # the validation photos, for export-time calibration and later re-scoring
        learn.dls.valid_ds.items[['path', 'label']].to_csv(run_dir / VALID_ITEMS, index=False)

    state = json.loads(state_path.read_text()) if resume else {'phase': 0, 'epoch': -1, 'best': None}
    tracker = BestCheckpoint(best=state['best'])
    recipe_cbs = []   # one instance for all phases: the EMA averages across them
    if recipe.ema_decay:
        recipe_cbs.append(WeightEMA(recipe.ema_decay, state_path=run_dir / 'models' / 'ema_last.pth',
                                    lora_alpha=recipe.lora_alpha))
    if recipe.mixup or recipe.cutmix:
        recipe_cbs.append(MixUpCutMix(p_mixup=recipe.mixup, p_cutmix=recipe.cutmix))
    started = time.time()
    with _data_parallel(learn):
        _fit_phases(learn, recipe, pretrained, state, state_path, tracker, recipe_cbs, resume)
    if not (run_dir / 'models' / f'{BEST}.pth').exists():
        raise RuntimeError('no epoch was trained: nothing to report')
    _load_checkpoint(learn, BEST, recipe, with_opt=False)   # every process: fastai's load is a barrier
    if main_process:
        with _this_process_only():
            report_run(learn, run_dir, seconds=time.time() - started)
    return learn


@contextmanager
def _this_process_only():
    """After data-parallel training the main process reports alone: fastai gathers predictions across
    processes whenever WORLD_SIZE > 1, and the other processes have finished."""
    world_size = os.environ.get('WORLD_SIZE')
    os.environ['WORLD_SIZE'] = '1'
    try:
        yield
    finally:
        if world_size is None:
            del os.environ['WORLD_SIZE']
        else:
            os.environ['WORLD_SIZE'] = world_size


@contextmanager
def _data_parallel(learn: Learner):
    """Under `accelerate launch` (WORLD_SIZE > 1): data-parallel training through fastai.distributed, like
    `learn.distrib_ctx()`, with two changes so that it also runs on CPU processes (gloo), where it is tested:
    fastai's DistributedTrainer reads the wrapped model's `.device`, which DistributedDataParallel has on GPUs
    only, and its DistributedDL broadcasts the batch order as a CUDA tensor (what NCCL needs, gloo refuses)."""
    if num_distrib() <= 1:
        yield learn
        return
    import torch.distributed as dist
    from fastai.callback.progress import ProgressCallback
    from fastai.distributed import DistributedDL, DistributedTrainer

    class DataLoader(DistributedDL):
        def _broadcast(self, t, rank):
            if dist.get_backend() == 'nccl':
                return super()._broadcast(t, rank)
            t = torch.tensor(t, dtype=torch.long)
            dist.broadcast(t, rank)
            return t.tolist()

    class Trainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else DataLoader(dl, device=self.learn.dls.device)
    learn.add_cb(Trainer(sync_bn=False, cpu=learn.dls.device.type == 'cpu'))  # cpu: gloo process group
    if not rank_distrib():
        print(f'Data-parallel training over {num_distrib()} processes ({learn.dls.device.type})')
    if rank_distrib():
        learn.remove_cb(ProgressCallback)
    try:
        yield learn
    finally:
        learn.remove_cb(Trainer)
        if rank_distrib():
            learn.add_cb(ProgressCallback())


def _fit_phases(learn, recipe, pretrained, state, state_path, tracker, recipe_cbs, resume):
    """Each phase of `_phases` as one `fit_one_cycle`, from where `state` says the run stands."""
    for i, phase in enumerate(_phases(recipe, pretrained)):
        if i < state['phase']:
            continue
        start_epoch = 0
        if resume and i == state['phase']:
            _load_checkpoint(learn, LAST, recipe, with_opt=True)
            start_epoch = state['epoch'] + 1
            if start_epoch >= phase['epochs']:
                continue
            print(f'Resuming phase {phase["name"]} at epoch {start_epoch}')
        if phase.get('merge_lora') and has_lora(learn.model):
            merge_lora(learn.model)   # the EMA follows in WeightEMA.before_fit
            learn.opt = None          # a new optimizer over the merged weights
        _set_trainable(learn, phase['trainable'])
        cbs = [tracker, ResumableCheckpoint(state_path, i, tracker), HistoryCSV(phase['name']), *recipe_cbs]
        if recipe.patience:
            cbs.append(EarlyStopping(patience=recipe.patience))
        if recipe.accumulate > 1:
            cbs.append(GradientAccumulation(n_acc=recipe.bs * recipe.accumulate))
        learn.fit_one_cycle(phase['epochs'], _phase_lrs(learn, recipe, phase), pct_start=recipe.warmup_pct,
                            start_epoch=start_epoch, cbs=cbs)
        if not rank_distrib():
            state_path.write_text(json.dumps({'phase': i + 1, 'epoch': -1, 'best': float(tracker.best)}))


def find_lr(recipe: Recipe, data_dir: str | Path, run_dir: str | Path, pretrained: bool | str | Path = True,
            split: str = 'grouped', num_workers: int = 0, limit_items: int | None = None) -> dict[str, float]:
    """fastai's `lr_find` on the recipe's first phase (head only when pretrained): saves lr_find.png in
    `run_dir` and returns the suggested learning rates."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from fastai.callback.schedule import minimum, slide, steep, valley
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    learn, _ = prepare_learner(recipe, data_dir, run_dir, pretrained, split, num_workers, limit_items)
    _set_trainable(learn, _phases(recipe, pretrained)[0]['trainable'])
    suggestions = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=True)
    plt.savefig(run_dir / 'lr_find.png', dpi=100, bbox_inches='tight')
    plt.close('all')
    return {name: float(value) for name, value in suggestions._asdict().items()}


def report_run(learn: Learner, run_dir: Path, seconds: float | None = None) -> dict:
    """Confusion matrix (CSV + PNG) and metrics.json for the weights `learn` holds, on its validation set."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    interp = ClassificationInterpretation.from_learner(learn)
    cm = interp.confusion_matrix()
    np.savetxt(run_dir / 'confusion_matrix.csv', cm, fmt='%d', delimiter=',', header=','.join(CLASSES))
    interp.plot_confusion_matrix(figsize=(6, 6), title=f'{run_dir.name}: validation confusion matrix')
    plt.savefig(run_dir / 'confusion_matrix.png', dpi=100, bbox_inches='tight')
    plt.close('all')
    per_class = {c: float(cm[i, i] / cm[i].sum()) for i, c in enumerate(CLASSES)}
    metrics = {'valid_accuracy': float(np.trace(cm) / cm.sum()), 'n_valid': int(cm.sum()),
               'per_class_accuracy': per_class}
    if seconds is not None:
        metrics['train_seconds'] = round(seconds, 1)
    (run_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


def _stratified_subset(items, n, seed):
    """A small class-balanced subset (for smoke tests and quick trials)."""
    if n >= len(items):
        return items
    _, keep = stratified_split([label for _, label in items], valid_pct=n / len(items), seed=seed)
    return [items[i] for i in keep]
