"""Classification metrics, in one place: what evaluation writes to metrics.json and what training's report
writes per run. Counting is scikit-learn's (`confusion_matrix`, `accuracy_score`,
`precision_recall_fscore_support`, `f1_score`); the top-label ECE is not in scikit-learn and stays
`calibration.expected_calibration_error`; the NLL is ours (`nll`: why there)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics as sk

from .calibration import expected_calibration_error
from .labels import CLASSES

__all__ = ['ECE_BINS', 'confusion_matrix', 'accuracy', 'accuracy_by_class', 'nll', 'classification_metrics']

ECE_BINS = 15
_LABELS = list(range(len(CLASSES)))   # every class a row and a column, present or not


def _indices(values) -> np.ndarray:
    return torch.as_tensor(values).detach().long().cpu().numpy()


def confusion_matrix(targets, predicted) -> np.ndarray:
    """K x K counts (K = len(CLASSES)); rows: true class, columns: predicted class, in CLASSES order."""
    return sk.confusion_matrix(_indices(targets), _indices(predicted), labels=_LABELS)


def accuracy(targets, predicted) -> float:
    """Share of equal entries (targets vs predictions, or one model's classes vs another's)."""
    return float(sk.accuracy_score(_indices(targets), _indices(predicted)))


def accuracy_by_class(cm) -> tuple[float | None, int, dict[str, float | None]]:
    """(accuracy, number of photos, each class's accuracy, i.e. its recall) of a confusion matrix (rows: true
    class, CLASSES order). None where there is no photo to count (0/0), not NaN: strict JSON refuses NaN."""
    cm = np.asarray(cm)
    total, rows = int(cm.sum()), cm.sum(axis=1)
    per_class = {c: float(cm[i, i] / rows[i]) if rows[i] else None for i, c in enumerate(CLASSES)}
    return (float(np.trace(cm) / total) if total else None), total, per_class


def nll(probabilities, targets) -> float:
    """Mean -log probability of the true class, the probabilities clamped at 1e-12. Not scikit-learn's
    `log_loss`: it clips at the dtype's epsilon instead (1.2e-7 for float32) and checks or renormalises rows,
    which moves the number of a confident mistake (a true-class probability of 1e-13: 27.6 here, 15.9 there)."""
    probabilities = torch.as_tensor(probabilities).detach().double().cpu()
    true_p = probabilities.gather(1, torch.as_tensor(targets).long().cpu()[:, None])[:, 0]
    return float(-true_p.clamp(min=1e-12).log().mean())


def classification_metrics(probabilities: torch.Tensor, targets: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """Summary numbers (JSON-ready) of N x 5 probabilities against N class indices.

    accuracy; per class (CLASSES order) precision, recall, F1, support (true photos) and predicted (photos
    predicted as it), 0.0 where undefined (scikit-learn's zero_division=0); macro F1, the unweighted mean F1
    over the classes present in the targets or the predictions (scikit-learn's `f1_score(average='macro')`);
    confusion_matrix (rows: true class, columns: predicted); top-label ECE with `n_bins` equal-width bins; NLL
    (`nll`); mean confidence."""
    probabilities = torch.as_tensor(probabilities).detach().double().cpu()
    targets = torch.as_tensor(targets).long().cpu()
    if probabilities.ndim != 2 or probabilities.shape[1] != len(CLASSES) or probabilities.shape[0] == 0:
        raise ValueError(f'probabilities must be N x {len(CLASSES)} with N > 0, not {tuple(probabilities.shape)}')
    if targets.shape != probabilities.shape[:1]:
        raise ValueError(f'targets must be a vector of {probabilities.shape[0]} class indices')
    n = probabilities.shape[0]
    predicted = probabilities.argmax(dim=1)
    cm = confusion_matrix(targets, predicted)
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        targets.numpy(), predicted.numpy(), labels=_LABELS, zero_division=0)
    n_predicted = cm.sum(axis=0)
    per_class = {name: {'precision': float(precision[i]), 'recall': float(recall[i]), 'f1': float(f1[i]),
                        'support': int(support[i]), 'predicted': int(n_predicted[i])}
                 for i, name in enumerate(CLASSES)}
    n_right = int(np.trace(cm))
    return {
        'n_photos': n,
        'accuracy': accuracy(targets, predicted),
        # labels=None: the classes present in the targets or the predictions, as macro_f1_classes lists them
        'macro_f1': float(sk.f1_score(targets.numpy(), predicted.numpy(), average='macro', zero_division=0)),
        'macro_f1_classes': [c for c in CLASSES if per_class[c]['support'] or per_class[c]['predicted']],
        'ece': expected_calibration_error(probabilities, targets, n_bins),
        'ece_bins': n_bins,
        'nll': nll(probabilities, targets),
        'mean_confidence': float(probabilities.max(dim=1).values.mean()),
        'n_misclassified': n - n_right,
        'per_class': per_class,
        'confusion_matrix': cm.tolist(),
    }
