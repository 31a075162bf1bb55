"""Knowledge distillation's losses and pieces (Hinton et al. 2015; Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent"): a frozen teacher sees exactly the student's augmented and mixed batch, and
the loss becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * recipe loss
    + feature_weight * (1 - cos(projection(student features), teacher features))

The feature term (FitNets-style) regresses the teacher's pooled features (the input of its classifier) from the
student's through a linear projection, `model.distill_head`, that trains with the student's head and is dropped
at export. The fastai callback that applies them during training is `callbacks.Distillation` (fastai ships none;
timm's distillation lives in its training script, not in a reusable piece). This module imports no fastai: the
export side reads `without_distill_head` from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .teachers import feature_dim

DISTILL_HEAD = 'distill_head'   # the projection's name in the student: its keys never reach an exported file


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


def without_distill_head(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(DISTILL_HEAD + '.')}


def with_distill_head(splitter):
    """`splitter` whose last group (the head's: it trains in every phase) also holds the projection."""
    def split(model):
        groups = splitter(model)
        if hasattr(model, DISTILL_HEAD):
            groups = [*groups[:-1], [*groups[-1], *getattr(model, DISTILL_HEAD).parameters()]]
        return groups
    return split


@dataclass
class Teacher:
    """A frozen teacher network and the input it wants: its normalisation and its size (None: the student's)."""
    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
