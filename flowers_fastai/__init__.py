"""flowers_fastai: train ConvNeXt V2 and CLIP ViT flower classifiers with fastai, deliver them as plain PyTorch.

Importing the package (and `flowers_fastai.submit`) does not import fastai: the delivery side runs without it.
`flowers_fastai.learner` (the notebook face, flowers_fastai/notebook.py, which also gives fastai's `Learner` its
`fit_recipe` method) imports it when first used.
"""
from .labels import CLASSES

__version__ = '0.1.0'
__all__ = ['CLASSES', '__version__']


def __getattr__(name: str):
    # PEP 562: fastai is imported only when the notebook face is asked for
    if name == 'learner':
        from . import notebook
        return getattr(notebook, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
