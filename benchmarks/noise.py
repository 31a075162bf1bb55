"""Is this machine quiet enough to benchmark on, and if not, is the noise inside it or outside?

    python benchmarks/noise.py                  # the CNN (convnextv2_tiny, random init), 20 s
    python benchmarks/noise.py --seconds 60

Runs `submit.predict` in a loop on the example photos and prints its latency spread (median, p10, p90, max);
over the same window, how much CPU this process got and which other processes of this machine used any
(from /proc, Linux only), its involuntary context switches and major page faults. A process that gets ~100 %
of every core while its latency still swings points at the host (other tenants of a shared VM), not at
anything this machine runs; compare the median with latency.py's quiet-spell figures in docs/benchmarks.md.
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

from latency import PHOTOS, make_weights  # noqa: E402


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seconds', type=float, default=20.0)
    args = parser.parse_args(argv)
    from flowers_fastai.submit import load_cnn_model, predict
    with tempfile.TemporaryDirectory() as tmp:
        weights, reference, _, _ = make_weights('cnn', Path(tmp))
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
    return 0


if __name__ == '__main__':
    sys.exit(main())
