"""Training glue: a run folder, a fastai Learner, the fine-tuning phases, resume, data-parallel training, and the
run's reports. The callbacks it puts on the Learner are in callbacks.py, the checkpoint files in checkpoints.py."""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import num_distrib, rank_distrib
from fastai.vision.all import (Adam, ClassificationInterpretation, CrossEntropyLossFlat, GradientAccumulation,
                               GradientClip, Learner, accuracy, default_device, set_seed)

from .callbacks import (BestCheckpoint, Distillation, EarlyStopping, FolderAccuracy, HistoryCSV, MixUpCutMix,
                        ProgressiveResize, ResumableCheckpoint, RunRecipe, StopOnNonFinite, TrainingDiverged,
                        WeightEMA, folder_metrics)
from .checkpoints import (BEST, LAST, RESUME_TODO, read_resume_point, restore_checkpoint, resume_point_path,
                          save_resume_point)
from .data import DatasetError, flower_dataloaders, split_photos
from .run_config import RunConfig
from .run_folder import VALID_ITEMS, RunFolderError, atomic_write, read_run_config, write_json
from .labels import CLASSES
from .lora import has_lora, merge_lora
from .distill import Teacher, attach_distill_head, load_teacher, with_distill_head
from .families import get_family
from .metrics import accuracy_by_class, confusion_matrix
from .models import create_model, layerwise_lrs
from .preprocess import Preprocessing
from .photo_cache import PhotoCache, cached_datablock
from .recipes import OWN_SIZE, Phase, Recipe, recipe_phases


def preprocessing_for(recipe: Recipe, size: int | None = None) -> Preprocessing:
    """The family's input pipeline for the recipe's weights (architecture and tag) at `size` (default: the
    recipe's)."""
    return get_family(recipe.family).preprocessing(recipe.arch, recipe.pretrained_tag, size or recipe.size)


def delivery_preprocessing(recipe: Recipe) -> Preprocessing:
    """What the delivered file is fed: the size the run ends at (progressive resizing's, when on)."""
    return preprocessing_for(recipe, recipe.resize_to if recipe.resize_epochs else None)


def teacher_input_size(recipe: Recipe, teacher_preprocessing: dict) -> int | None:
    """The size a teacher sees the student's batch at: `teacher_size` when > 0, the teacher's own training size
    when -1 (`OWN_SIZE`), the student's own when 0 (None: the batch as it is)."""
    if recipe.teacher_size == OWN_SIZE:
        return int(teacher_preprocessing['size'])
    return recipe.teacher_size or None


def make_learner(recipe: Recipe, dls, model, run_dir: Path, extra_metrics=()) -> Learner:
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(label_smoothing=recipe.label_smoothing),
                    opt_func=Adam,  # fastai's Adam with decoupled weight decay: AdamW
                    wd=recipe.wd, metrics=[accuracy, *extra_metrics],
                    splitter=with_distill_head(get_family(recipe.family).splitter),
                    path=run_dir, model_dir='models', cbs=[GradientClip(1.0)],
                    train_bn=False)  # frozen means frozen: no norm layer trains in a linear probe
    if default_device().type == 'cuda':
        learn.to_fp16()  # AMP on GPU only: bf16/fp16 on this kind of CPU is slower than fp32
    return learn


def _phase_lrs(learn: Learner, recipe: Recipe, phase: Phase):
    """The phase's LR per parameter group of the model as it is now (merging LoRA adds the embedding group)."""
    head_lr = recipe.lr * recipe.lr_scale
    if not phase.layerwise:
        return head_lr / phase.lr_div
    n_groups = len(learn.splitter(learn.model))
    return layerwise_lrs(n_groups, head_lr, head_lr / recipe.backbone_lr_div, recipe.llrd) / phase.lr_div


def _set_trainable(learn: Learner, trainable: int | None) -> None:
    n_groups = len(learn.splitter(learn.model))
    if trainable is None or trainable >= n_groups:
        learn.unfreeze()
    else:
        learn.freeze_to(-trainable)


def _check_split_sides(dls, recipe: Recipe, split: str) -> None:
    """Before training: each class on both sides of the split, and at least one full training batch (fastai
    drops an incomplete one: fewer photos than `bs` would be 0 batches, an epoch that trains nothing)."""
    train_counts, valid_counts = Counter(dls.train_ds.items['label']), Counter(dls.valid_ds.items['label'])
    for c in CLASSES:
        for side, counts in (('training', train_counts), ('validation', valid_counts)):
            if not counts[c]:
                n = train_counts[c] + valid_counts[c]
                how = ('copies of one another, which the grouped split keeps on one side: add other photos of '
                       f'{c}, or pass --split stratified' if split == 'grouped' else f'too few: add photos of {c}')
                raise DatasetError(f'class {c!r} has no photo on the {side} side of the split: its {n} photo(s) are '
                                   f'{how}')
    n_train, per_step = len(dls.train_ds), recipe.bs * recipe.accumulate
    if n_train < per_step:
        flag = f'--bs {recipe.bs}' + (f' x --accumulate {recipe.accumulate}' if recipe.accumulate > 1 else '')
        raise DatasetError(f'{n_train} training photos are fewer than one optimizer step of {per_step} ({flag}): '
                           f'fastai drops an incomplete batch, so no epoch would train; pass a --bs of at most '
                           f'{n_train}' + (' (and a smaller --accumulate)' if recipe.accumulate > 1 else '')
                           + ', or add photos')


def prepare_learner(recipe: Recipe, data_dir: str | Path, run_dir: str | Path, pretrained: bool | str | Path = True,
                    split: str = 'grouped', num_workers: int = 0, limit_items: int | None = None):
    """Seeded data, split, model and fastai Learner for `recipe`; returns (learn, config) where `config` is what
    config.json records. `split`: 'grouped' audits the photos first (audit.py): copies of one photo stay on one
    side and photos filed under two classes are left out; 'stratified' splits photos independently."""
    set_seed(recipe.seed, reproducible=False)
    photos = split_photos(data_dir, split, recipe.valid_pct, recipe.data_split_seed, limit_items)
    pp = preprocessing_for(recipe)

    augment = dict(min_scale=recipe.min_scale, randaugment=recipe.randaugment,
                   randaugment_magnitude=recipe.randaugment_magnitude, color_jitter=recipe.color_jitter,
                   random_erasing=recipe.random_erasing)
    cache = None

    def dataloaders_at(size: int | None = None):   # progressive resizing rebuilds them at another size
        nonlocal cache
        if not recipe.cache_size:
            return flower_dataloaders(photos.frame, preprocessing_for(recipe, size), bs=recipe.bs,
                                      num_workers=num_workers, **augment)
        if cache is None:
            largest = max(recipe.size, recipe.resize_to if recipe.resize_epochs else 0)
            if recipe.cache_size < largest:
                warnings.warn(f'--cache-size {recipe.cache_size} is below the largest training size, {largest} px: '
                              'crops are upsampled from it (pass --cache-size of at least that)')
            started = time.time()
            cache = PhotoCache(photos.frame, recipe.cache_size)
            print(f'{len(cache.train)} training photos decoded into memory at {recipe.cache_size} px '
                  f'({cache.nbytes / 2 ** 20:.0f} MiB, {time.time() - started:.0f} s)')
        return cached_datablock(cache, preprocessing_for(recipe, size), **augment).dataloaders(
            photos.frame, bs=recipe.bs, num_workers=num_workers)
    dls = dataloaders_at()
    model = create_model(recipe, pretrained=pretrained)   # first: an unknown architecture or tag is said first
    _check_split_sides(dls, recipe, split)   # before any training
    teachers = [load_teacher(source) for source in recipe.teacher]
    if recipe.distill_features and teachers:
        attach_distill_head(model, teachers[0][0])
    learn = make_learner(recipe, dls, model, Path(run_dir), folder_metrics(photos.names))
    learn.add_cb(ProgressiveResize(dataloaders_at, pp.size))
    if teachers:
        learn.add_cb(Distillation([Teacher(net, tuple(tpp['mean']), tuple(tpp['std']), teacher_input_size(recipe, tpp))
                                   for net, tpp in teachers], (pp.mean, pp.std), alpha=recipe.distill_alpha,
                                  temperature=recipe.distill_temperature, feature_weight=recipe.distill_features))
    config = RunConfig(recipe=recipe, preprocessing=delivery_preprocessing(recipe),
                       data=tuple(str(folder.resolve()) for folder in photos.folders), split=split,
                       pretrained=str(pretrained) if pretrained else False, n_train=len(dls.train_ds),
                       n_valid=len(dls.valid_ds), left_out_filed_under_two_classes=sum(photos.dropped.values()),
                       torch=torch.__version__, **get_family(recipe.family).network_config(model))   # ViT: tower shape
    learn.add_cb(RunRecipe(recipe, pretrained, config))   # what learn.fit_recipe() trains (notebook.py)
    return learn, config


def train(recipe: Recipe, data_dir: str | Path, run_dir: str | Path, pretrained: bool | str | Path = True,
          resume: bool = False, num_workers: int = 0, limit_items: int | None = None,
          split: str = 'grouped') -> Learner:
    """Train one model into `run_dir`: models/best.pth (best validation accuracy), history.csv,
    confusion_matrix.{csv,png}, config.json, metrics.json. Returns the Learner holding the best weights.
    With `resume`, the run continues after its last finished epoch, on the split it was started with."""
    run_dir = Path(run_dir)
    last, state = resume_point_path(run_dir), None
    if resume:
        if not last.exists() and not (run_dir / 'config.json').exists():
            raise FileNotFoundError(f'nothing to resume in {run_dir} (no config.json, no models/last.pth): '
                                    f'{RESUME_TODO}')
        split = read_run_config(run_dir, RESUME_TODO).split
        if _no_epoch_finished(run_dir):
            # killed before its first epoch ended (config.json is written first): nothing to lose, so the run
            # starts over from its recorded settings instead of refusing to resume
            print(f'{run_dir}: interrupted before its first epoch ended; starting it over')
            resume = False
        else:
            # before any work: a broken resume point is said at once (read onto the device the run trains on)
            state = read_resume_point(last, map_location=default_device())
    elif (run_dir / 'models').exists():
        raise FileExistsError(f'{run_dir} already holds a run: pass --resume to continue it, or another --name')
    run_dir.mkdir(parents=True, exist_ok=True)
    learn, config = prepare_learner(recipe, data_dir, run_dir, pretrained=False if resume else pretrained,
                                    split=split, num_workers=num_workers, limit_items=limit_items)
    return run_phases(learn, recipe, pretrained, config=None if resume else config, state=state)


def _no_epoch_finished(run_dir: Path) -> bool:
    """No checkpoint written and no epoch logged: what a run killed during its first epoch leaves."""
    history = run_dir / 'history.csv'
    logged = history.exists() and len(history.read_text().splitlines()) > 1   # more than the header
    return not (run_dir / 'models').exists() and not logged


def freeze_for_phase(learn: Learner, recipe: Recipe, pretrained: bool | str | Path, index: int = 0) -> None:
    """Freeze `learn` as phase `index` trains it (0: the first, `frozen` when pretrained: the head; what lr_find
    explores)."""
    _set_trainable(learn, recipe_phases(recipe, pretrained)[index].trainable)


def run_phases(learn: Learner, recipe: Recipe, pretrained: bool | str | Path, config: RunConfig | None = None,
               state: dict | None = None) -> Learner:
    """The recipe's phases on `learn` (from `prepare_learner`), into its folder `learn.path`, as `train` runs
    them: models/best.pth, history.csv, the reports. `config`: written to config.json with the validation photos
    (a new run); `state`: the resume point to continue from (`read_resume_point`; None: a new run). Returns the
    Learner holding the best weights."""
    run_dir, resume = Path(learn.path), state is not None
    main_process = rank_distrib() == 0   # under `accelerate launch`, only the main process writes files
    if config is not None and main_process:
        write_json(run_dir / 'config.json', config.to_dict())
        # the validation photos, for export-time calibration and later re-scoring
        atomic_write(run_dir / VALID_ITEMS,
                     lambda tmp: learn.dls.valid_ds.items[['path', 'label']].to_csv(tmp, index=False))

    if not resume:
        state = {'phase': 0, 'epoch': -1, 'best': None}   # a new run: before the first epoch of the first phase
    tracker = BestCheckpoint(best=state['best'], recipe=recipe)
    ema = None   # one instance for all phases: the EMA averages across them
    if recipe.ema_decay:
        ema = WeightEMA(recipe.ema_decay, lora_alpha=recipe.lora_alpha, saved=state.get('ema'))
    recipe_cbs = [ema] if ema else []
    if recipe.mixup or recipe.cutmix:
        recipe_cbs.append(MixUpCutMix(p_mixup=recipe.mixup, p_cutmix=recipe.cutmix))
    started = time.time()
    try:
        with _data_parallel(learn):
            _fit_phases(learn, recipe, pretrained, state, tracker, ema, recipe_cbs)
    except (RunFolderError, TrainingDiverged) as err:   # from a callback: fastai prefixed "Exception occured in ...:\n\t"
        raise type(err)(str(err).split('\n\t')[-1]) from None
    if not (run_dir / 'models' / f'{BEST}.pth').exists():
        raise RunFolderError(f'no epoch was trained, so there is no {run_dir / "models" / f"{BEST}.pth"} to report on: '
                             f'{RESUME_TODO}')
    restore_checkpoint(learn, BEST, recipe, with_opt=False)   # every process: fastai's load is a barrier
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


def _fit_phases(learn, recipe, pretrained, state, tracker, ema, recipe_cbs):
    """Each of the recipe's phases as one `fit_one_cycle`, from where the resume point `state` says the run
    stands (a new run: phase 0, before its first epoch). fastai's `start_epoch` skips the finished epochs, so
    the one-cycle schedule goes on where it stopped."""
    resuming = 'model' in state
    for i, phase in enumerate(recipe_phases(recipe, pretrained)):
        if i < state['phase']:
            continue
        start_epoch = 0
        if resuming and i == state['phase']:   # the weights and optimizer of that epoch (the EMA has its own)
            restore_checkpoint(learn, LAST, recipe, with_opt=True, saved=state)
            state.pop('model'), state.pop('opt', None)   # loaded: no second copy held for the whole run
            start_epoch = state['epoch'] + 1
            if start_epoch >= phase.epochs:
                continue
            print(f'Resuming phase {phase.name} at epoch {start_epoch}')
        if phase.merge_lora and has_lora(learn.model):
            merge_lora(learn.model)   # the EMA follows in WeightEMA.before_fit
            learn.opt = None          # a new optimizer over the merged weights
        if phase.size and start_epoch == 0:
            tracker.best = None   # best.pth is delivered at this size: only epochs at this size compete for it
        if phase.size and learn.progressive_resize.resize(phase.size):
            print(f'Phase {phase.name}: photos at {phase.size} px')
        _set_trainable(learn, phase.trainable)
        cbs = [tracker, ResumableCheckpoint(i, tracker, ema), HistoryCSV(phase.name), StopOnNonFinite(), *recipe_cbs]
        if recipe.patience:
            cbs.append(EarlyStopping(patience=recipe.patience))
        if recipe.accumulate > 1:
            cbs.append(GradientAccumulation(n_acc=recipe.bs * recipe.accumulate))
        learn.fit_one_cycle(phase.epochs, _phase_lrs(learn, recipe, phase), pct_start=recipe.warmup_pct,
                            start_epoch=start_epoch, cbs=cbs)
        if not rank_distrib():   # the phase is done (early stopping included): a resume starts the next one
            save_resume_point(learn, i + 1, -1, tracker.best, ema.state() if ema else None)


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
    freeze_for_phase(learn, recipe, pretrained)   # the first phase: what it trains is what lr_find explores
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
    by_folder = [m for m in getattr(learn, 'metrics', ()) if isinstance(m, FolderAccuracy)]
    if by_folder:   # one pass over the photos for the matrix and each folder's accuracy
        _, targs, decoded = learn.get_preds(dl=interp.dl, with_decoded=True)
        cm = confusion_matrix(targs, decoded)
        interp.confusion_matrix = lambda: cm   # what plot_confusion_matrix draws
    else:
        cm = interp.confusion_matrix()
    np.savetxt(run_dir / 'confusion_matrix.csv', cm, fmt='%d', delimiter=',', header=','.join(CLASSES))
    interp.plot_confusion_matrix(figsize=(6, 6), title=f'{run_dir.name}: validation confusion matrix')
    plt.savefig(run_dir / 'confusion_matrix.png', dpi=100, bbox_inches='tight')
    plt.close('all')
    # a class with no validation photo has no accuracy: null, not NaN (prepare_learner refuses such a split)
    valid_accuracy, n_valid, per_class = accuracy_by_class(cm)
    metrics = {'valid_accuracy': valid_accuracy, 'n_valid': n_valid, 'per_class_accuracy': per_class}
    if by_folder:   # validation photos are in the DataLoader's order, as the predictions
        sources, right = interp.dl.items['source'].to_numpy(), (decoded == targs).numpy()
        metrics['valid_accuracy_by_folder'] = {m.name.removeprefix('accuracy_'): float(right[sources == m.source]
                                                                                       .mean()) for m in by_folder}
    if seconds is not None:
        metrics['train_seconds'] = round(seconds, 1)
    write_json(run_dir / 'metrics.json', metrics)   # strict JSON: a NaN is refused, never written
    print(json.dumps(metrics, indent=2))
    return metrics
