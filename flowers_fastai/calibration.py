"""Calibration of class probabilities: temperature scaling, the expected calibration error, reliability diagrams.

Pure functions of tensors (no model code, no fastai): export fits the temperature on validation logits, evaluation
measures how well the delivered probabilities are calibrated.

    T = fit_temperature(logits, labels)                  # probabilities = softmax(logits / T)
    expected_calibration_error(probs, labels)            # top-label ECE, 15 equal-width bins
    reliability_diagram(before, after, labels, 'reliability.png')

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides the logits by one
scalar T > 0 fitted to minimise the negative log-likelihood of held-out labels; T > 1 softens an over-confident
model. It never changes the argmax, so accuracy is untouched.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

__all__ = ['fit_temperature', 'temperature_nll', 'expected_calibration_error', 'reliability_bins',
           'reliability_diagram']

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _as_probs_and_labels(probs, labels, what: str = 'probs') -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs).detach().to(torch.float64).cpu()
    labels = torch.as_tensor(labels).detach().cpu()
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f'{what} must be an N x C tensor (C >= 2), not of shape {tuple(probs.shape)}')
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f'labels must be a vector of the {probs.shape[0]} row(s) of {what}, '
                         f'not of shape {tuple(labels.shape)}')
    if probs.shape[0] == 0:
        raise ValueError(f'{what} is empty: nothing to calibrate')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f'labels must be class indices (integers), not {labels.dtype}')
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]:
        raise ValueError(f'labels must lie in 0..{probs.shape[1] - 1}, found {int(labels.min())}..{int(labels.max())}')
    if not torch.isfinite(probs).all():
        raise ValueError(f'{what} holds non-finite values')
    return probs, labels


def temperature_nll(logits, labels, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature) (in float64)."""
    logits, labels = _as_probs_and_labels(logits, labels, 'logits')
    return float(_nll(logits, labels, math.log(temperature)))


def _nll(logits64: torch.Tensor, labels: torch.Tensor, log_t: float) -> float:
    z = logits64 * math.exp(-log_t)
    return float((torch.logsumexp(z, dim=1) - z.gather(1, labels[:, None])[:, 0]).mean())


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.01, 100.0), tol: float = 1e-7) -> float:
    """The temperature T > 0 that minimises the mean NLL of softmax(logits / T) for `labels`.

    `logits`: N x C (any float dtype), `labels`: N class indices. Deterministic: a golden-section search over
    log T within `bounds`, in float64. The NLL is convex in 1/T, hence unimodal in log T, so the search finds
    the global minimum; when it lies outside `bounds` (e.g. T -> 0 on perfectly separated logits) the nearest
    bound is returned.
    """
    logits, labels = _as_probs_and_labels(logits, labels, 'logits')
    lo, hi = bounds
    if not 0 < lo < hi < math.inf:
        raise ValueError(f'bounds must satisfy 0 < low < high < inf, not {bounds}')
    a, b = math.log(lo), math.log(hi)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll(logits, labels, c), _nll(logits, labels, d)
    while b - a > tol:
        if fc <= fd:       # minimum in [a, d]
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll(logits, labels, c)
        else:              # minimum in [c, b]
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll(logits, labels, d)
    # The bounds are candidates too (a minimum at a bound is returned as that bound), and so is T = 1: where
    # the NLL does not depend on T (e.g. all-equal logits) nothing is learnt and the logits are left as they are.
    candidates = [(a + b) / 2.0, math.log(lo), math.log(hi)] + ([0.0] if lo <= 1.0 <= hi else [])
    values = {k: _nll(logits, labels, k) for k in candidates}
    lowest = min(values.values())
    ties = [k for k in candidates if values[k] <= lowest + 1e-12 * max(1.0, abs(lowest))]
    return float(min(max(math.exp(min(ties, key=abs)), lo), hi))   # exp(log(100)) may be 100.00000000000004


def reliability_bins(probs, labels, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Top-label confidence histogram: `n_bins` equal-width bins (lower, upper] over (0, 1] of the largest
    probability of each row. Returns float64 tensors of length n_bins: 'lower', 'upper', 'count',
    'accuracy' (fraction whose argmax is the label) and 'confidence' (mean top probability); the last two
    are 0 in empty bins."""
    probs, labels = _as_probs_and_labels(probs, labels)
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f'n_bins must be a positive integer, not {n_bins!r}')
    n_bins = int(n_bins)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bin i holds edges[i] < conf <= edges[i + 1]; conf == 0 (impossible for a top label) joins the first bin
    index = (torch.searchsorted(edges, confidence, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    hits = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    safe = count.clamp(min=1.0)
    return {'lower': edges[:-1], 'upper': edges[1:], 'count': count,
            'accuracy': hits / safe, 'confidence': conf_sum / safe}


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """Top-label expected calibration error with `n_bins` equal-width confidence bins:
    sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|. 0 is perfect calibration."""
    bins = reliability_bins(probs, labels, n_bins)
    total = bins['count'].sum()
    return float((bins['count'] / total * (bins['accuracy'] - bins['confidence']).abs()).sum())


def reliability_diagram(probs_before, probs_after, labels, path: str | os.PathLike, n_bins: int = 15,
                        title: str = 'Reliability diagram',
                        names: tuple[str, str] = ('before calibration', 'after calibration')) -> Path:
    """Write a PNG of accuracy against confidence per bin: one bar series for `probs_before` and one for
    `probs_after` (may be None: one series), the diagonal of perfect calibration, and the ECE of each series in
    the legend; a lower panel shows how many photos fall in each bin. `names` label the two series (e.g.
    ('plain', 'TTA')). matplotlib (Agg, no pyplot, so no GUI and no global backend change) is imported here."""
    from matplotlib.figure import Figure   # lazy: delivery code never needs matplotlib

    series = [(names[0], probs_before)] + ([(names[1], probs_after)] if probs_after is not None else [])
    binned = [(name, reliability_bins(p, labels, n_bins), expected_calibration_error(p, labels, n_bins))
              for name, p in series]
    width = 1.0 / n_bins
    fig = Figure(figsize=(6.0, 6.5), dpi=100)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle='--', color='gray', linewidth=1, label='perfect calibration')
    colors = ['tab:red', 'tab:blue']
    bar_w = width / len(binned)
    for k, (name, bins, ece) in enumerate(binned):
        left = bins['lower'].numpy() + k * bar_w
        filled = bins['count'].numpy() > 0
        ax.bar(left[filled], bins['accuracy'].numpy()[filled], width=bar_w, align='edge', alpha=0.7,
               color=colors[k], edgecolor='black', linewidth=0.5, label=f'{name} (ECE {ece:.4f})')
        ax.plot(bins['confidence'].numpy()[filled], bins['accuracy'].numpy()[filled], 'o', color=colors[k],
                markersize=3)
        ax_count.bar(left, bins['count'].numpy(), width=bar_w, align='edge', color=colors[k], alpha=0.7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel('accuracy')
    ax.set_title(title)
    ax.legend(loc='upper left', fontsize=8)
    ax.grid(alpha=0.3)
    ax_count.set_xlabel(f'confidence (top-label probability, {n_bins} bins)')
    ax_count.set_ylabel('photos')
    ax_count.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format='png')
    return path
