"""The seeds protocol: one run per seed, a summary with mean and spread, resume, and export of the best seed."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from flowers_fastai.exporting import export_run, latest_run
from flowers_fastai.labels import CLASSES


def test_seeds_protocol_summarises_resumes_and_exports_the_best_seed(colour_folder, tmp_path, capsys):
    import train as train_cli
    argv = ['cnn', '--seeds', '0', '1', '--data', str(colour_folder), '--runs', str(tmp_path), '--name', 'exp',
            '--arch', 'convnextv2_atto', '--size', '32', '--bs', '8', '--epochs', '2', '--lr', '3e-3',
            '--no-pretrained', '--valid-pct', '0.25']
    assert train_cli.main(argv) == 0
    exp = tmp_path / 'exp'
    summary = json.loads((exp / 'summary.json').read_text())
    accuracies = [json.loads((exp / s / 'metrics.json').read_text())['valid_accuracy'] for s in ('seed0', 'seed1')]
    assert summary['valid_accuracy'] == {'seed0': accuracies[0], 'seed1': accuracies[1]}
    assert summary['mean'] == np.mean(accuracies) and summary['std'] == np.std(accuracies, ddof=1)
    assert summary['best_run'] == f'seed{int(np.argmax(accuracies))}'
    assert set(summary['per_class_mean']) == set(CLASSES)
    md = (exp / 'summary.md').read_text()
    assert f'{summary["mean"]:.4f} +/- {summary["std"]:.4f}' in md and '(best)' in md
    assert (exp / 'curves.png').stat().st_size > 1000
    for seed in (0, 1):   # each seed: its own split, history, confusion matrix, best checkpoint
        run = exp / f'seed{seed}'
        assert json.loads((run / 'config.json').read_text())['recipe']['seed'] == seed
        assert list(pd.read_csv(run / 'history.csv').columns[2:5]) == ['train_loss', 'valid_loss', 'accuracy']
        assert (run / 'confusion_matrix.csv').is_file() and (run / 'models' / 'best.pth').is_file()
    from flowers_fastai.data import grouped_stratified_split, scan_image_folder
    labels = [label for _, label in scan_image_folder(colour_folder).items]
    groups = list(range(len(labels)))   # seeds 0 and 1 validate on different photos
    assert grouped_stratified_split(labels, groups, 0.25, 0)[1] != grouped_stratified_split(labels, groups, 0.25, 1)[1]

    # resume: finished seeds are kept as they are, a new seed is added
    before = (exp / 'seed0' / 'metrics.json').stat().st_mtime_ns
    assert train_cli.main(['cnn', '--seeds', '0', '1', '2', '--resume', '--name', 'exp', '--runs', str(tmp_path)]) == 0
    assert (exp / 'seed0' / 'metrics.json').stat().st_mtime_ns == before
    assert json.loads((exp / 'summary.json').read_text())['seeds'] == ['seed0', 'seed1', 'seed2']
    assert json.loads((exp / 'seed2' / 'config.json').read_text())['recipe']['epochs'] == 2   # the saved recipe

    # export takes the experiment's global best seed
    best = json.loads((exp / 'summary.json').read_text())['best_run']
    assert latest_run(tmp_path, 'cnn') == exp
    out = export_run(exp, tmp_path / 'cnn.pth')
    assert json.loads(out.with_suffix('.json').read_text())['run'] == best
    state = torch.load(exp / best / 'models' / 'best.pth', map_location='cpu', weights_only=True)
    exported = torch.load(out, map_location='cpu', weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in state.items())
