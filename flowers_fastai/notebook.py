"""The notebook face of training: the fastai `Learner` that `train.py` trains, to explore as in the fastai course
(`learn.dls.show_batch()`, `learn.lr_find()`, `ClassificationInterpretation.from_learner(learn)`), and the
recipe's phases run on it with `learn.fit_recipe()`, a `Learner` method as fastai's own `fine_tune` is (patched on
when this module is imported). docs/notebook.ipynb walks through it.

    learn = learner('cnn', 'path/to/flowers', arch='convnextv2_atto', size=128)
    learn.lr_find()
    learn.fit_recipe()
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from fastai.learner import Learner
from fastcore.basics import patch

from . import training
from .callbacks import RunRecipe
from .recipes import RECIPES, Phase, Recipe

# Besides the recipe's fields, what train.py's command line also decides about the Learner, with its defaults.
# `limit`: a class-balanced subset of that many photos; `run_dir`: None is a new temporary folder.
OPTIONS = {'pretrained': True, 'run_dir': None, 'limit': None, 'split': 'grouped', 'num_workers': 0}
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != 'family')   # the family is `learner`'s argument


def learner(family: str, data: str | Path | list, **overrides) -> Learner:
    """The fastai Learner (with its DataLoaders) that `train.py <family> --data <data>` would train: the same
    seeded split, DataBlock, model, loss, optimizer, splitter (for the layer-wise LRs) and callbacks, frozen as
    the recipe's first phase trains it (the head only, when pretrained), as `vision_learner` gives it. It carries
    the recipe, the starting weights and config.json's content in its `RunRecipe` callback, `learn.run_recipe`.

    `data`: a folder of class folders, or a list of several (each split on its own, accuracy also reported per
    folder, as `train.py --data A B`).
    `overrides`: recipe fields (`arch`, `size`, `bs`, `epochs`, ... see flowers_fastai/recipes.py) and
    `pretrained` (True: the published weights, downloaded; a path: a local copy of them; False: from scratch),
    `run_dir` (where `learn.fit_recipe()` writes the run, as train.py's runs/<name>; default: a new temporary folder),
    `limit`, `split`, `num_workers` (as train.py's --limit, --split, --num-workers).
    """
    if family not in RECIPES:
        raise ValueError(f'unknown family {family!r}; expected one of {sorted(RECIPES)}')
    unknown = sorted(set(overrides) - set(RECIPE_FIELDS) - set(OPTIONS))
    if unknown:
        raise TypeError(f'learner() got unknown override(s) {", ".join(unknown)}; valid: {", ".join(OPTIONS)} '
                        f'and the recipe fields {", ".join(RECIPE_FIELDS)}')
    options = {name: overrides.pop(name, default) for name, default in OPTIONS.items()}
    recipe = RECIPES[family].override(**overrides)
    pretrained = options['pretrained']
    if recipe.init_from:   # as train.py: the trained weights are the start, then trained as from scratch
        if isinstance(pretrained, (str, os.PathLike)):
            raise ValueError('init_from and a pretrained file both give the starting weights: choose one')
        pretrained = False
    if options['run_dir'] is None:
        run_dir = Path(tempfile.mkdtemp(prefix=f'flowers-{family}-'))
    else:
        run_dir = Path(options['run_dir'])
        if (run_dir / 'models').exists():   # as train.py: a run folder holds one run
            raise FileExistsError(f'{run_dir} already holds a run: pass another run_dir')
        run_dir.mkdir(parents=True, exist_ok=True)
    learn, _ = training.prepare_learner(recipe, data, run_dir, pretrained=pretrained, split=options['split'],
                                        num_workers=options['num_workers'], limit_items=options['limit'])
    training.freeze_for_phase(learn, recipe, pretrained)
    return learn


def _run_recipe(learn: Learner) -> RunRecipe:
    """The recipe `learn` trains (its `RunRecipe` callback), or a TypeError for a Learner made otherwise."""
    run = getattr(learn, 'run_recipe', None)
    if not isinstance(run, RunRecipe):
        raise TypeError('fit_recipe trains a Learner made by flowers_fastai.learner(...)')
    return run


def phases(learn: Learner) -> list[Phase]:
    """The recipe's phases for `learn`, in order (`recipes.Phase`: name, epochs, how many parameter groups from
    the top train, LR divisor, ...)."""
    run = _run_recipe(learn)
    return training.recipe_phases(run.recipe, run.pretrained)


@patch
def fit_recipe(self: Learner) -> Learner:
    """Train this Learner (from `flowers_fastai.learner`) through the recipe's phases exactly as train.py does,
    into `self.path`: models/best.pth, history.csv, config.json, confusion_matrix.{csv,png}, metrics.json;
    `python export.py --run <self.path>` delivers it. Returns the Learner, holding the best epoch's weights."""
    run = _run_recipe(self)
    if training.resume_point_path(self.path).exists():
        raise FileExistsError(f'{self.path} already holds a trained run: make a new learner to train again')
    with _notebook_plots_kept():
        return training.run_phases(self, run.recipe, run.pretrained, config=run.config)


@contextmanager
def _notebook_plots_kept():
    """The run's reports draw their PNGs with matplotlib.use('Agg'): the notebook's own backend (inline plots)
    comes back afterwards."""
    import matplotlib
    backend = matplotlib.get_backend()
    try:
        yield
    finally:
        matplotlib.use(backend)
