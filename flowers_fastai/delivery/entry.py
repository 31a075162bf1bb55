"""What an entry of the delivery registry holds (`flowers_fastai/delivery/__init__.py` lists the entries)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..preprocess import Preprocessing
from ..run_config import RunConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Delivery:
    """How a family is delivered."""
    name: str                                           # the sidecar's "family"; predict --model; export --family
    title: str                                          # 'a ConvNeXt V2 CNN', for messages
    weights_file: str                                   # default file name, looked up on submit's search path
    head_key: str                                       # the head's weight: 5 rows, one per class
    owns: Callable[[StateDict], bool]                   # whether a state_dict's key names are this family's
    # (state_dict, Sidecar, path) -> (the delivery network built on the meta device with the file's tensors
    # assigned, its preprocessing); ValueError naming the file for tensors or a sidecar that do not fit
    build: Callable[[StateDict, object, Path], tuple[nn.Module, Preprocessing]]
    # (a run's RunConfig, its trained network) -> the sidecar fields only this family writes
    sidecar_fields: Callable[[RunConfig, nn.Module], dict]
    # (state_dict, Sidecar, the file's preprocessing) -> a RunConfig that describes the network (no photos), to
    # rebuild its training network from a delivered file (an exported file as a teacher)
    network_config: Callable[[StateDict, object, Preprocessing], RunConfig]

    @property
    def loader(self) -> str:
        """The name of `submit`'s loader for this family."""
        return f'load_{self.name}_model'
