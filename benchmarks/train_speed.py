"""One distillation training step on this CPU, as the real loop runs it, with each speed lever on and off in one run.

    python benchmarks/train_speed.py [--sizes 96 128 160] [--bs 32] [--batches 6] [--data ../shared/data/flowers]

Per student size, it times (median over rounds that alternate the variants, so that a noisy host moves them alike):
- the whole fastai loop, `learn.fit` over `--batches` training batches of real photos with the brief's
  regularisation (RandAugment + ColorJitter, MixUp/CutMix, Random Erasing, EMA, gradient clipping) and an
  EfficientNet-Lite0 teacher at `--teacher-size`, in two set-ups:
    today: photos decoded from disk and augmented one by one (`data.flower_datablock`), the teacher in fp32 NCHW;
    fast:  photos decoded once into memory (`--cache-size`, `photo_cache.py`), the teacher in channels_last;
- the parts: one batch of each data pipeline, the student's step (forward, backward, AdamW), the teacher's forward
  (NCHW, channels_last);
- the fp32 floor: 3 x the student's forward FLOPs + the teacher's forward FLOPs, over the matmul peak measured in
  the same run (a 2048 x 2048 fp32 matmul), as images/s.

Random weights: the cost does not depend on them. Prints images/s, each part's share, and the ratio fast / today.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

from distill_cost import median_seconds  # noqa: E402

from flowers_fastai.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from flowers_fastai.recipes import CNN  # noqa: E402


def seconds(fn, repeats: int = 3) -> float:
    return median_seconds(fn, repeats)


def matmul_peak(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / seconds(lambda: a @ b, 5)


def forward_flops(model, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def make_learner(args, size: int, fast: bool):
    """A student Learner on real photos with the brief's regularisation and a Lite0 teacher, as train.py builds it."""
    from flowers_fastai.teachers import build_timm_classifier
    from flowers_fastai.training import prepare_learner
    recipe = CNN.override(arch=args.student, size=size, bs=args.bs, epochs=1, drop_path=0.1, ema_decay=0.99,
                          split_seed=0, cache_size=args.cache_size if fast else 0)
    learn, _ = prepare_learner(recipe, args.data, tempfile.mkdtemp(prefix='train-speed-'), pretrained=False,
                               split='stratified', limit_items=args.limit)
    from flowers_fastai.callbacks import Distillation, MixUpCutMix, WeightEMA
    from flowers_fastai.distill import Teacher
    distill = Distillation(Teacher(build_timm_classifier(args.teacher), (0.5,) * 3, (0.5,) * 3, args.teacher_size),
                           (IMAGENET_MEAN, IMAGENET_STD))
    distill.channels_last = fast   # today: the teacher in NCHW, as before the lever
    learn.add_cbs([WeightEMA(recipe.ema_decay), MixUpCutMix(p_mixup=recipe.mixup, p_cutmix=recipe.cutmix), distill])
    learn.unfreeze()
    return learn


def loop_seconds_per_image(learn, batches: int) -> float:
    """`learn.fit` over the first `batches` training batches (a full epoch's loop, cut short), seconds per image."""
    from fastai.callback.core import CancelTrainException, CancelValidException
    from fastai.vision.all import Callback

    class StopAfter(Callback):   # cancel the phases (not the epoch): every callback's after_train still runs
        def after_batch(self):
            if self.training and self.iter + 1 >= batches:
                raise CancelTrainException()

        def before_validate(self):
            raise CancelValidException()   # validation is not the step measured here
    learn.fit(1, 1e-4, cbs=StopAfter())   # warm-up epoch: oneDNN primitives, the cache's first touch
    started = time.perf_counter()
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, 1e-4, cbs=StopAfter())
    return (time.perf_counter() - started) / (batches * learn.dls.bs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--student', default='convnextv2_atto')
    parser.add_argument('--teacher', default='tf_efficientnet_lite0')
    parser.add_argument('--teacher-size', type=int, default=128)
    parser.add_argument('--sizes', type=int, nargs='+', default=[96, 128, 160])
    parser.add_argument('--bs', type=int, default=32)
    parser.add_argument('--batches', type=int, default=6, help='training batches timed per loop')
    parser.add_argument('--rounds', type=int, default=2, help='alternating rounds of today / fast per size')
    parser.add_argument('--cache-size', type=int, default=160)
    parser.add_argument('--compile', action='store_true', help="also time the student's step under torch.compile")
    parser.add_argument('--limit', type=int, default=600, help='photos read (the loop needs --batches x --bs)')
    parser.add_argument('--data', type=Path, nargs='+', default=[ROOT.parent / 'shared' / 'data' / 'flowers'])
    args = parser.parse_args(argv)
    import timm
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.bs}, student {args.student}, '
          f'teacher {args.teacher} at {args.teacher_size} px, {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}')
    peak = matmul_peak()
    print(f'fp32 matmul peak (2048^3): {peak / 1e9:.0f} GFLOP/s')
    student = timm.create_model(args.student, num_classes=5, drop_path_rate=0.1)
    teacher = timm.create_model(args.teacher, num_classes=5).eval()
    teacher_flops = forward_flops(teacher, args.teacher_size)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    rows = []
    for size in args.sizes:
        floor = (3 * forward_flops(student, size) + teacher_flops) / peak   # seconds per image
        student.train()
        x, y = torch.randn(args.bs, 3, size, size), torch.randint(0, 5, (args.bs,))

        def step(xb):
            opt.zero_grad()
            F.cross_entropy(student(xb), y).backward()
            opt.step()
        xt = torch.randn(args.bs, 3, args.teacher_size, args.teacher_size)
        parts = {'student step, NCHW': seconds(lambda: step(x))}
        student.to(memory_format=torch.channels_last)
        parts['student step, channels_last'] = seconds(lambda: step(x.contiguous(memory_format=torch.channels_last)))
        student.to(memory_format=torch.contiguous_format)
        if args.compile:   # Inductor: the compile time is paid once per process (and again per new input size)
            compiled = torch.compile(student)
            started = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            print(f'torch.compile of the student step at {size} px: {time.perf_counter() - started:.0f} s')
            parts['student step, torch.compile'] = seconds(lambda: (opt.zero_grad(), F.cross_entropy(
                compiled(x), y).backward(), opt.step()))
        teacher_cl = timm.create_model(args.teacher, num_classes=5).eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            parts['teacher forward, NCHW'] = seconds(lambda: teacher(xt))
            parts['teacher forward, channels_last'] = seconds(lambda: teacher_cl(xt.contiguous(
                memory_format=torch.channels_last)))
        learners = {name: make_learner(args, size, fast) for name, fast in (('today', False), ('fast', True))}
        for name, learn in learners.items():
            dl = learn.dls.train
            parts[f'data batch, {name}'] = seconds(lambda: next(iter(dl)), 2)
        loops = {name: [] for name in learners}
        for _ in range(args.rounds):
            for name, learn in learners.items():
                loops[name].append(loop_seconds_per_image(learn, args.batches))
        per_image = {name: statistics.median(v) for name, v in loops.items()}
        print(f'\n{size} px (floor {1 / floor:.0f} img/s at the measured peak)')
        for name, s in parts.items():
            print(f'  {name:32s} {args.bs / s:7.1f} img/s')
        for name, s in per_image.items():
            spread = f'{args.bs and min(loops[name]) and 1 / max(loops[name]):.1f}-{1 / min(loops[name]):.1f}'
            print(f'  whole loop, {name:20s} {1 / s:7.1f} img/s (rounds: {spread}), {floor / s:.0%} of the floor')
        ratio = per_image['today'] / per_image['fast']
        print(f'  fast / today: {ratio:.2f}x')
        rows.append((size, 1 / per_image['today'], 1 / per_image['fast'], ratio))
    print('\nsize  today img/s  fast img/s  ratio')
    for size, today, fast, ratio in rows:
        print(f'{size:4d}  {today:11.1f}  {fast:10.1f}  {ratio:5.2f}x')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
