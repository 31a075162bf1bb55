"""Knowledge distillation's losses and pieces (Hinton et al. 2015; Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent"): a frozen teacher sees exactly the student's augmented and mixed batch, and
the loss becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * recipe loss
    + feature_weight * (1 - cos(projection(student features), teacher features))

The feature term (FitNets-style) regresses the teacher's pooled features (the input of its classifier) from the
student's through a linear projection, `model.distill_head`, that trains with the student's head and is dropped
at export. The fastai callback that applies them during training is `callbacks.Distillation` (fastai ships none;
timm's distillation lives in its training script, not in a reusable piece). It also reads teachers back
(`load_teacher`: a run folder of any family, or an exported file).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .delivery import DELIVERIES, delivery_of
from .families import get_family
from .run_folder import DISTILL_HEAD, load_weights, read_run_config, resolve_run
from .sidecar import Sidecar
from .teachers import feature_dim



def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher/T || student/T), averaged over the batch (the T^2 keeps its gradients at the scale of the
    cross-entropy's as T changes, Hinton et al.)."""
    return kd_loss_to(student_logits, ensemble_log_probs([teacher_logits], temperature), temperature)


def ensemble_log_probs(teacher_logits: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log of the teachers' averaged probabilities at temperature T (one teacher: its log_softmax(logits / T))."""
    log_probs = torch.stack([F.log_softmax(t.float() / temperature, -1) for t in teacher_logits])
    return torch.logsumexp(log_probs, 0) - math.log(len(teacher_logits))


def kd_loss_to(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(target || student/T), averaged over the batch; `target_log_probs` from `ensemble_log_probs`."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), target_log_probs, log_target=True,
                    reduction='batchmean') * t * t


def feature_loss(projected: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged: matches the direction of the teacher's features, not their scale."""
    return (1 - F.cosine_similarity(projected.float(), teacher_features.float(), dim=-1)).mean()


def attach_distill_head(student: nn.Module, teacher: nn.Module) -> nn.Linear:
    """Give `student` the projection of its pooled features onto the teacher's (trained with the head)."""
    head = nn.Linear(feature_dim(student), feature_dim(teacher))
    setattr(student, DISTILL_HEAD, head)
    return head


def with_distill_head(splitter):
    """`splitter` whose last group (the head's: it trains in every phase) also holds the projection."""
    def split(model):
        groups = splitter(model)
        if hasattr(model, DISTILL_HEAD):
            groups = [*groups[:-1], [*groups[-1], *getattr(model, DISTILL_HEAD).parameters()]]
        return groups
    return split


# ---------------------------------------------------------------------------------------------- reading a teacher
def load_teacher(source: str | Path) -> tuple[nn.Module, dict]:
    """A trained classifier for distillation and its preprocessing ({'mean', 'std', 'size'}), from a run folder
    (its models/best.pth and config.json, any family) or an exported `cnn_flowers.pth` / `vit_flowers.pth`.
    Files are read with `weights_only=True`; every key is checked."""
    source = Path(source)
    state, path = read_trained_weights(source)
    return _teacher_from_run(source, state, path) if source.is_dir() else _teacher_from_export(path, state)


def read_trained_weights(source: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights of a run folder (models/best.pth, of its best seed) or of an exported file, and their path:
    tensors only (`run_folder.load_weights`: a crafted pickle is refused, none of its code runs), a student's
    distillation projection left out."""
    if source.is_dir():
        path = resolve_run(source) / 'models' / 'best.pth'
        if not path.is_file():
            raise FileNotFoundError(f'{path} does not exist: the run has not finished an epoch yet')
    elif source.is_file():
        path = source
    else:
        raise FileNotFoundError(f'{source} not found: give a run folder (runs/NAME) or an exported .pth')
    return load_weights(path, 'give a run folder whose models/best.pth is whole, or an exported .pth'), path


def _teacher_from_run(run_dir: Path, state: dict[str, torch.Tensor], best: Path) -> tuple[nn.Module, dict]:
    config = read_run_config(run_dir)
    model = get_family(config.family).trained_network(config, state, str(best))
    pp = config.preprocessing
    return model.eval(), {'mean': list(pp.mean), 'std': list(pp.std), 'size': pp.size}


def _teacher_from_export(path: Path, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """An exported file as a teacher: the delivery loader's own checks (every sidecar field it reads), then the
    family's training network (autograd-ready, unlike the delivery one) with the same weights."""
    sidecar = Sidecar.read(path)
    family = delivery_of(state)
    if family is None:
        raise ValueError(f'{path} is neither an exported CNN nor ViT file; a teacher of another architecture is '
                         'given by its run folder (runs/NAME)')
    delivery = DELIVERIES[family]
    _, pp = delivery.build(state, sidecar, path)   # every check submit makes, and the file's preprocessing
    model = get_family(family).trained_network(delivery.network_config(state, sidecar, pp), state, str(path))
    return model.eval(), {'mean': list(pp.mean), 'std': list(pp.std), 'size': pp.size}


@dataclass
class Teacher:
    """A frozen teacher network and the input it wants: its normalisation and its size (None: the student's)."""
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
