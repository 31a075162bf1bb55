"""flowers_fastai.calibration: temperature scaling recovers a known temperature, the ECE equals hand-computed
values, the reliability diagram is a real PNG."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from flowers_fastai.calibration import (expected_calibration_error, fit_temperature, reliability_bins,
                                        reliability_diagram, temperature_nll)


def synthetic(n: int = 20000, scale: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """True logits and labels drawn from their softmax: softmax(true logits) is perfectly calibrated."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 5, generator=g) * scale
    labels = torch.multinomial(logits.softmax(1), 1, generator=g)[:, 0]
    return logits, labels


@pytest.mark.parametrize('true_t', [3.0, 0.5])
def test_fit_temperature_recovers_the_temperature_of_mis_scaled_logits(true_t):
    logits, labels = synthetic()
    model_logits = logits * true_t        # over-confident for T > 1, under-confident for T < 1
    t = fit_temperature(model_logits, labels)
    assert isinstance(t, float)
    assert t == pytest.approx(true_t, rel=0.1)
    before = expected_calibration_error(model_logits.softmax(1), labels)
    after = expected_calibration_error((model_logits / t).softmax(1), labels)
    assert after < before / 3 and after < 0.03
    # it is the minimum of the NLL: a little off either side is worse
    assert temperature_nll(model_logits, labels, t) < temperature_nll(model_logits, labels, t * 1.05)
    assert temperature_nll(model_logits, labels, t) < temperature_nll(model_logits, labels, t / 1.05)


def test_fit_temperature_of_calibrated_logits_is_one_and_deterministic():
    logits, labels = synthetic(seed=1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(logits, labels) == t
    assert fit_temperature(logits.double(), labels) == pytest.approx(t, rel=1e-6)   # dtype does not matter


def test_fit_temperature_edge_cases():
    # logits that say nothing: the NLL does not depend on T, which stays 1
    assert fit_temperature(torch.zeros(4, 5), torch.tensor([0, 1, 2, 3])) == 1.0
    # perfectly separated logits: the NLL falls as T -> 0, the lower bound is returned
    labels = torch.arange(5).repeat(4)
    assert fit_temperature(torch.eye(5)[labels] * 4, labels, bounds=(0.05, 20.0)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match='shape'):
        fit_temperature(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='0..4'):
        fit_temperature(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='non-finite'):
        fit_temperature(torch.tensor([[float('nan')] * 5]), torch.tensor([0]))
    with pytest.raises(ValueError, match='empty'):
        fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))


def _rows(top: list[float], predicted: list[int]) -> torch.Tensor:
    """5-class probability rows whose largest value `top[i]` sits at `predicted[i]` (rest shared evenly)."""
    rows = []
    for p, k in zip(top, predicted):
        row = [(1 - p) / 4] * 5
        row[k] = p
        rows.append(row)
    return torch.tensor(rows)


def test_ece_of_a_hand_computed_example():
    # confidences 0.85 (right), 0.85 (wrong), 0.55 (right), 0.35 (right); 10 bins:
    # (0.8, 0.9]: 2 photos, accuracy 0.5, confidence 0.85 -> |gap| 0.35, weight 2/4
    # (0.5, 0.6]: 1 photo,  accuracy 1,   confidence 0.55 -> 0.45, weight 1/4
    # (0.3, 0.4]: 1 photo,  accuracy 1,   confidence 0.35 -> 0.65, weight 1/4
    probs = _rows([0.85, 0.85, 0.55, 0.35], [0, 1, 2, 3])
    labels = torch.tensor([0, 2, 2, 3])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.5 * 0.35 + 0.25 * 0.45 + 0.25 * 0.65)
    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins['count'].tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 2, 0]
    assert bins['accuracy'][8].item() == pytest.approx(0.5)


def test_ece_depends_on_the_bins():
    # 0.85 right and 0.95 wrong: one bin of 5 ((0.8, 1]: accuracy 0.5, confidence 0.9), two bins of 10
    probs = _rows([0.85, 0.95], [0, 0])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.4)
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.5 * 0.15 + 0.5 * 0.95)


def test_ece_is_zero_when_confidence_is_accuracy():
    # all certain and right (confidence 1.0 falls in the last bin), or 0.6 confident and right 3 times in 5
    assert expected_calibration_error(torch.eye(5), torch.arange(5)) == 0.0
    probs = _rows([0.6] * 5, [0] * 5)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1, 2])) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match='n_bins'):
        expected_calibration_error(probs, torch.zeros(5, dtype=torch.long), n_bins=0)


def test_reliability_diagram_writes_a_png(tmp_path):
    logits, labels = synthetic(n=2000)
    path = reliability_diagram((3 * logits).softmax(1), logits.softmax(1), labels, tmp_path / 'sub' / 'rel.png',
                               title='test')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == 'PNG' and min(img.size) > 200
    single = reliability_diagram(logits.softmax(1), None, labels, tmp_path / 'one.png')
    with Image.open(single) as img:
        img.verify()
