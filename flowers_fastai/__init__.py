"""flowers_fastai: train ConvNeXt V2 and CLIP ViT flower classifiers with fastai, deliver them as plain PyTorch.

Importing the package (and `flowers_fastai.submit`) does not import fastai: the delivery side runs without it.
"""
from .labels import CLASSES

__version__ = '0.1.0'
__all__ = ['CLASSES', '__version__']
