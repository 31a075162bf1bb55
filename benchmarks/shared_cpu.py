"""`predict` latency of the shipped CNN at 1 and 2 intra-op threads, as the machine is and with 2 more processes
that keep the cores busy (pure Python loops): how much a shared CPU costs each thread count.

    python benchmarks/shared_cpu.py      # from the repo root; ~1 minute
"""
import multiprocessing as mp
import os
import statistics
import time

import torch

from flowers_fastai.submit import load_cnn_model, predict

def burn(stop):
    x = 0
    while not stop.is_set():
        x += 1

def measure(model, photo, n=30):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        predict(model, photo)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)

if __name__ == '__main__':
    photo = 'examples/100930342_92e8746431_n.jpg'
    model = load_cnn_model()
    for _ in range(5):
        predict(model, photo)
    print(f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} before the run, torch {torch.__version__}')
    for busy in (0, 2):
        stop = mp.Event()
        procs = [mp.Process(target=burn, args=(stop,)) for _ in range(busy)]
        for p in procs:
            p.start()
        time.sleep(1)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            med, worst = measure(model, photo)
            print(f'{busy} busy processes added, {threads} threads: median {med:.1f} ms, max {worst:.1f} ms', flush=True)
        stop.set()
        for p in procs:
            p.join()
