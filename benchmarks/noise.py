"""Is this machine quiet enough to benchmark on, and if not, is the noise inside it or outside?

    python benchmarks/noise.py                  # the CNN (convnextv2_tiny, random init), 20 s + 30 s
    python benchmarks/noise.py --seconds 60 --rounds-seconds 90

Runs `submit.predict` in a loop on the example photos and prints its latency spread (median, p10, p90, max);
over the same window, how much CPU this process got and which other processes of this machine used any
(from /proc, Linux only), its involuntary context switches and major page faults. A process that gets ~100 %
of every core while its latency still swings points at the host (other tenants of a shared VM), not at
anything this machine runs; compare the median with latency.py's quiet-spell figures in docs/benchmarks.md.

Then, what the latency moves with: short rounds, each timing a 1024 x 1024 matmul (the CPU's speed, from
cache; best of 3), a read of 256 MB (memory bandwidth; best of 2) and 5 predictions (median), back to back;
it prints their ranges, the rank correlation (Spearman) of the latency with each, and the latency's ratio to
the FLOP floor (FLOPs / that round's matmul rate, as latency.py's but with a smaller matmul) in the quarter of
rounds where the matmul ran fastest and in the quarter where it ran slowest.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import PHOTOS, count_flops, linear, make_weights  # noqa: E402


def cpu_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (name, user + system clock ticks)} of every process readable in /proc."""
    ticks = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            text = stat.read_text()
        except OSError:   # the process ended meanwhile
            continue
        name = text[text.index('(') + 1:text.rindex(')')]
        fields = text[text.rindex(')') + 2:].split()
        ticks[int(stat.parent.name)] = (name, int(fields[11]) + int(fields[12]))   # utime, stime
    return ticks


def ranks(values: list[float]) -> list[int]:
    """Each value's rank, 0 for the smallest."""
    order = sorted(range(len(values)), key=values.__getitem__)
    rank = [0] * len(values)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (statistics.correlation(..., method='ranked') needs Python 3.12)."""
    return statistics.correlation(ranks(x), ranks(y))


def paired_rounds(model, seconds: float) -> list[tuple[float, float, float]]:
    """[(matmul GFLOP/s, memory read GB/s, predict ms)], one tuple per round of about half a second."""
    import torch
    from flowers_fastai.submit import predict
    a, b, big = torch.randn(1024, 1024), torch.randn(1024, 1024), torch.randn(64 * 2**20)   # big: 256 MB
    rounds, start = [], time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            matmul = min(timed(lambda: linear(a, b, None)) for _ in range(3))
            read = min(timed(big.sum) for _ in range(2))
            ms = statistics.median(timed(lambda: predict(model, PHOTOS[i % len(PHOTOS)])) for i in range(5)) * 1e3
            rounds.append((2 * 1024 ** 3 / matmul / 1e9, big.numel() * 4 / read / 1e9, ms))
    return rounds


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seconds', type=float, default=20.0, help='the predict loop')
    parser.add_argument('--rounds-seconds', type=float, default=30.0, help='the paired rounds (0: skip them)')
    args = parser.parse_args(argv)
    from flowers_fastai.submit import load_cnn_model, predict
    with tempfile.TemporaryDirectory() as tmp:
        weights, reference, size, _ = make_weights('cnn', Path(tmp))
        flops = count_flops(reference, size, None)
        del reference
        model = load_cnn_model(weights)
    for photo in PHOTOS[:2]:
        predict(model, photo)

    hz, cores = os.sysconf('SC_CLK_TCK'), os.cpu_count()
    before_ticks, before_usage, start = cpu_ticks(), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    times = []
    while time.perf_counter() - start < args.seconds:
        t = time.perf_counter()
        predict(model, PHOTOS[len(times) % len(PHOTOS)])
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    after_ticks, after_usage = cpu_ticks(), resource.getrusage(resource.RUSAGE_SELF)

    ms = sorted(t * 1e3 for t in times)
    print(f'{len(ms)} predictions in {elapsed:.1f} s: median {statistics.median(ms):.1f} ms, '
          f'p10 {ms[len(ms) // 10]:.1f}, p90 {ms[len(ms) * 9 // 10]:.1f}, max {ms[-1]:.1f}')
    print(f'involuntary context switches: {(after_usage.ru_nivcsw - before_usage.ru_nivcsw) / elapsed:.0f}/s; '
          f'major page faults: {after_usage.ru_majflt - before_usage.ru_majflt}')
    used = sorted(((ticks - before_ticks[pid][1]) / hz / elapsed, pid, name)
                  for pid, (name, ticks) in after_ticks.items() if pid in before_ticks)
    print(f'CPU over the window ({cores} cores = {cores * 100} %), processes that used any:')
    for share, pid, name in reversed(used):
        if share > 0:
            print(f'  {share:7.1%}  {name} (pid {pid}){"  <- this benchmark" if pid == os.getpid() else ""}')

    if args.rounds_seconds > 0:
        rounds = paired_rounds(model, args.rounds_seconds)
        matmul, read, latency_ms = (list(column) for column in zip(*rounds))
        print(f'{len(rounds)} paired rounds in {args.rounds_seconds:.0f} s (min / median / max):')
        for label, values, unit in (('1024^2 matmul', matmul, 'GFLOP/s'), ('256 MB read', read, 'GB/s'),
                                    ('predict, median of 5', latency_ms, 'ms')):
            print(f'  {label:21} {min(values):6.1f} / {statistics.median(values):6.1f} / {max(values):6.1f} {unit}')
        print(f'  rank correlation of the latency with the matmul rate: {spearman(latency_ms, matmul):+.2f}, '
              f'with the memory read rate: {spearman(latency_ms, read):+.2f}')
        by_speed = sorted(rounds, reverse=True)   # fastest matmul first
        quarter = max(1, len(rounds) // 4)

        def ratio(part):   # median over the rounds of latency / (FLOPs / that round's matmul rate)
            return statistics.median(ms / 1e3 / (flops / (gflops * 1e9)) for gflops, _, ms in part)

        print(f'  ratio to the floor, median: {ratio(rounds):.3f}x; in the fastest-matmul quarter of rounds '
              f'{ratio(by_speed[:quarter]):.3f}x, in the slowest {ratio(by_speed[-quarter:]):.3f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
