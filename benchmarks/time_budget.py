"""Where a forward pass of the delivery networks spends its time, per kind of op, timed inside the network.

    python benchmarks/time_budget.py                  # convnextv2_tiny and CLIP ViT-L/14, 224 px, random init
    python benchmarks/time_budget.py --models cnn --runs 30

A diagnostic, not a benchmark of `predict` (that is latency.py): it wraps the functions `inference_nets` calls
(`linear`, `conv2d`, GRN's `scale`, `F.layer_norm`, `F.scaled_dot_product_attention`) with timers, runs the
forward `--runs` times under `inference_mode`, and prints ms per forward for each kind, the linear layers' GFLOP/s,
and what no wrapper saw ("other": Python, views, the residual of the blocks). The timers add a few us per call.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowers_fastai import inference_nets as nets  # noqa: E402
from latency import random_network  # noqa: E402


def _timed(totals: dict, name_of, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name_of(*args, **kwargs)] += time.perf_counter() - start
        return out
    return wrapper


def budget(model: torch.nn.Module, runs: int) -> tuple[float, dict[str, float], float]:
    """(ms per forward, {kind: ms per forward}, GFLOP of the linear layers per forward)."""
    totals, flops = collections.defaultdict(float), collections.defaultdict(float)

    def linear_name(x, weight, bias, act=None, packed=None, residual=None):
        flops['linear'] += 2 * x.numel() // x.shape[-1] * weight.shape[0] * weight[0].numel()
        return 'linear'

    patches = [(nets, 'linear', _timed(totals, linear_name, nets.linear)),
               (nets, 'conv2d', _timed(totals, lambda x, conv, packed: 'depthwise conv' if conv.groups > 1
                                       else 'stem / downsampling conv', nets.conv2d)),
               (nets._GRN, 'scale', _timed(totals, lambda self, x: 'GRN statistics', nets._GRN.scale)),
               (F, 'layer_norm', _timed(totals, lambda *a, **k: 'layer norm', F.layer_norm)),
               (F, 'scaled_dot_product_attention',
                _timed(totals, lambda *a, **k: 'attention', F.scaled_dot_product_attention))]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    x = torch.randn(1, 3, 224, 224)
    try:
        for owner, name, wrapped in patches:
            setattr(owner, name, wrapped)
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            totals.clear()
            flops.clear()
            start = time.perf_counter()
            for _ in range(runs):
                model(x)
            forward = (time.perf_counter() - start) / runs
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return forward * 1e3, {k: v / runs * 1e3 for k, v in totals.items()}, flops['linear'] / runs / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=['cnn', 'vit'], default=['cnn', 'vit'])
    parser.add_argument('--runs', type=int, default=0, help='forward passes timed (default: 20 CNN, 3 ViT)')
    args = parser.parse_args(argv)
    print(f'{torch.get_num_threads()} threads, torch {torch.__version__}')
    for family in args.models:
        model = nets.pack_for_cpu(random_network(family)[0])   # the network latency.py times
        forward, parts, gflop = budget(model, args.runs or (20 if family == 'cnn' else 3))
        print(f'\n{"convnextv2_tiny" if family == "cnn" else "CLIP ViT-L/14"} 224 px: forward {forward:.1f} ms')
        for kind, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
            rate = f'  ({gflop / ms * 1e3:.0f} GFLOP/s over {gflop:.2f} GFLOP)' if kind == 'linear' else ''
            print(f'  {kind:<26}{ms:8.2f} ms{rate}')
        print(f'  {"other":<26}{forward - sum(parts.values()):8.2f} ms')
    return 0


if __name__ == '__main__':
    sys.exit(main())
