"""What a teacher's forward pass adds to a distillation step on this CPU, measured as ratios in one run.

    python benchmarks/distill_cost.py [--student convnextv2_atto] [--teacher tf_efficientnet_lite0] [--bs 32]

Times (median of --repeats, after a warm-up) one student training step (forward, backward, AdamW step) at the
student's size, and one teacher forward pass (eval, no grad) at each teacher size, on random batches; prints
images per second and the teacher's cost as a share of the student's step. Random weights: the cost does not
depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F


def median_seconds(fn, repeats: int) -> float:
    fn()   # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--student', default='convnextv2_atto')
    parser.add_argument('--teacher', default='tf_efficientnet_lite0')
    parser.add_argument('--student-sizes', type=int, nargs='+', default=[128, 224])
    parser.add_argument('--teacher-sizes', type=int, nargs='+', default=[128, 160, 224])
    parser.add_argument('--bs', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.bs}')

    student = timm.create_model(args.student, num_classes=5).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    labels = torch.randint(0, 5, (args.bs,))
    step_seconds = {}
    for size in args.student_sizes:
        x = torch.randn(args.bs, 3, size, size)

        def step():
            opt.zero_grad()
            F.cross_entropy(student(x), labels).backward()
            opt.step()
        step_seconds[size] = median_seconds(step, args.repeats)
        print(f'student {args.student} training step at {size} px: {args.bs / step_seconds[size]:6.1f} img/s')

    teacher = timm.create_model(args.teacher, num_classes=5).eval()
    for size in args.teacher_sizes:
        x = torch.randn(args.bs, 3, size, size)
        with torch.no_grad():
            seconds = median_seconds(lambda: teacher(x), args.repeats)
        shares = ', '.join(f'{seconds / s:.2f}x a student step at {n} px' for n, s in step_seconds.items())
        print(f'teacher {args.teacher} forward at {size} px: {args.bs / seconds:6.1f} img/s = {shares}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
