"""Train a flower classifier with fastai: `python train.py cnn|vit --data DIR [options]`.

Defaults are the seed's recipes (flowers_fastai/recipes.py); every option below overrides one of them.
Each run writes runs/<name>/: models/best.pth (best validation accuracy), history.csv, confusion_matrix.png/.csv,
config.json, metrics.json. Then `python export.py` turns the best weights into weights/<family>_flowers.pth.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from flowers_fastai.recipes import RECIPES, Recipe, check_recipe

RECIPE_FIELDS = {f.name for f in fields(Recipe)}   # the options that override the recipe (the others steer the run)
DEFAULT_DATA = Path(__file__).resolve().parent.parent / 'shared' / 'data' / 'flowers'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('family', choices=[*sorted(RECIPES), 'audit'],
                        help='cnn: timm ConvNeXt V2; vit: open_clip CLIP ViT; teacher: any timm classifier (--arch, '
                             'default tf_efficientnet_lite0), a teacher for --teacher; audit: report duplicate photos of --data')
    parser.add_argument('--data', type=Path, nargs='+', default=[DEFAULT_DATA],
                        help='folder(s) of class folders (daisy/ dandelion/ rose/ sunflower/ tulip/); with several, '
                             'each is split on its own (the first gets the split it gets alone) and validation '
                             'accuracy is also reported per folder (default: %(default)s)')
    parser.add_argument('--name', help='run folder name under --runs (default: <family>-<date-time>)')
    parser.add_argument('--runs', type=Path, default=Path('runs'), help='where run folders go (default: %(default)s)')
    parser.add_argument('--resume', action='store_true', help='continue the interrupted run --name from its last epoch')

    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained-file', type=Path,
                         help='local copy of the published pretrained weights (timm .safetensors/.pth for ConvNeXt V2; '
                              'OpenAI .pt or open_clip .bin/.safetensors for CLIP) instead of downloading them')
    weights.add_argument('--no-pretrained', action='store_true', help='train from scratch (random initialisation)')

    r = parser.add_argument_group('recipe (defaults: cnn / vit / teacher, from flowers_fastai/recipes.py)')
    cnn, vit, teacher = RECIPES['cnn'], RECIPES['vit'], RECIPES['teacher']

    def opt(flag, field, typ, help_):
        r.add_argument(flag, dest=field, type=typ, help=f'{help_} (default: {getattr(cnn, field)} / '
                                                        f'{getattr(vit, field)} / {getattr(teacher, field)})')
    opt('--arch', 'arch', str, 'timm convnextv2_{atto..huge} or open_clip ViT name (ViT-L-14-quickgelu for OpenAI '
                               'weights, ViT-L-14 for OpenCLIP ones)')
    opt('--pretrained-tag', 'pretrained_tag', str, 'timm tag / open_clip pretrained tag to download')
    opt('--size', 'size', int, 'image size in pixels')
    opt('--bs', 'bs', int, 'batch size')
    opt('--epochs', 'epochs', int, 'epochs of the partial/full phase (from scratch: of the scratch phase)')
    opt('--freeze-epochs', 'freeze_epochs', int, 'epochs of the frozen phase: the head only (linear probe)')
    opt('--lr', 'lr', float, 'peak learning rate of the head (one-cycle: warmup then cosine decay)')
    opt('--backbone-lr-div', 'backbone_lr_div', float, 'head LR / LR of the top backbone block')
    opt('--llrd', 'llrd', float, 'layer-wise LR decay: LR ratio of each backbone block to the block above it')
    opt('--frozen-phase-blocks', 'frozen_phase_blocks', int, 'top backbone blocks/stages trained with the head in '
                                                                'the frozen phase (old name: --phase-a-blocks)')
    r.add_argument('--phase-a-blocks', dest='frozen_phase_blocks', type=int, help=argparse.SUPPRESS)  # old name
    opt('--unfreeze-blocks', 'unfreeze_blocks', int, 'N > 0: a partial phase trains the top N blocks; 0: a full '
                                                        'phase trains everything')
    opt('--final-epochs', 'final_epochs', int, 'epochs of the final phase: everything at LR / --final-lr-div (with '
                                                  '--lora-rank: LoRA merged first, the light full fine-tune)')
    opt('--final-lr-div', 'final_lr_div', float, 'LR divisor of the final and resized phases')
    opt('--warmup-pct', 'warmup_pct', float, 'share of each phase spent warming up before the cosine decay')
    opt('--lr-base-bs', 'lr_base_bs', int, 'LRs are scaled by bs x accumulate / this (linear rule); 0 = no scaling')
    opt('--accumulate', 'accumulate', int, 'gradient accumulation: one optimizer step every N batches')
    opt('--wd', 'wd', float, 'AdamW decoupled weight decay')
    opt('--label-smoothing', 'label_smoothing', float, 'cross-entropy label smoothing')
    opt('--drop-path', 'drop_path', float, 'stochastic depth rate (ConvNeXt V2)')
    opt('--valid-pct', 'valid_pct', float, 'validation fraction of the stratified split')
    opt('--seed', 'seed', int, 'seed of Python, NumPy, PyTorch and the split')
    opt('--split-seed', 'split_seed', int, "the split's own seed (e.g. a teacher's split for students of several "
                                          'seeds); -1 = --seed')
    opt('--cache-size', 'cache_size', int, 'decode every photo once into memory at this size (px; at least the '
                                          'largest training size) and augment batches as tensors; 0 = from disk')
    opt('--min-scale', 'min_scale', float, "RandomResizedCrop's smallest crop, as a fraction of the photo")
    opt('--randaugment', 'randaugment', int, 'RandAugment operations per training photo; 0 = off')
    opt('--randaugment-magnitude', 'randaugment_magnitude', int, 'RandAugment magnitude (0-30)')
    opt('--color-jitter', 'color_jitter', float, 'ColorJitter strength (applied together with RandAugment); 0 = off')
    opt('--random-erasing', 'random_erasing', float, "probability that a training batch gets fastai's RandomErasing; 0 = off")
    opt('--ema-decay', 'ema_decay', float, 'weight EMA decay per step, validated and exported; 0 = off')
    opt('--mixup', 'mixup', float, 'probability of MixUp per training batch')
    opt('--cutmix', 'cutmix', float, 'probability of CutMix per training batch (MixUp and CutMix never both)')
    parser.add_argument('--split', choices=['grouped', 'stratified'], default='grouped',
                        help='grouped: stratified, with copies of a photo on one side and photos filed under two '
                             'classes left out (see `train.py audit`); stratified: photos split independently '
                             '(default: %(default)s)')
    opt('--lora-rank', 'lora_rank', int, 'ViT: LoRA rank on attention and MLP projections, merged at export; 0 = off')
    opt('--lora-alpha', 'lora_alpha', float, 'LoRA scale numerator (updates are scaled by alpha / rank)')
    opt('--patience', 'patience', int, 'early stopping after this many epochs without better validation accuracy; 0 = off')
    opt('--resize-to', 'resize_to', int, 'progressive resizing: the size of the last --resize-epochs epochs, and of '
                                        'the delivered file (end at the loader default, 224, for a CNN)')
    opt('--resize-epochs', 'resize_epochs', int, 'progressive resizing: epochs of the resized phase, at --resize-to, '
                                            'LR / --final-lr-div; 0 = off')
    parser.add_argument('--init-from', help='start from the trained weights of the same network, head included (a run '
                                            'folder or an exported .pth), then train as from scratch: one phase, '
                                            'everything (default: none)')
    d = parser.add_argument_group('knowledge distillation (cnn, vit)')
    d.add_argument('--teacher', nargs='+', help='distil from this teacher: a run folder (e.g. runs/lite0, trained '
                                                'with `train.py teacher`) or an exported cnn/vit .pth; several: '
                                                'their averaged probabilities at --distill-temperature (default: none)')
    for flag, field, typ, help_ in [
            ('--distill-alpha', 'distill_alpha', float, 'weight of the KL term (1 - alpha: the recipe loss)'),
            ('--distill-temperature', 'distill_temperature', float, 'softmax temperature T of the KL term'),
            ('--distill-features', 'distill_features', float, 'weight of the feature term (cosine to the teacher\'s '
                                                              'pooled features, through a projection dropped at export); 0 = logits only'),
            ('--teacher-size', 'teacher_size', int, "the teachers' input size (the student's batch resized); 0 = the "
                                                    "student's, -1 = each teacher's own training size")]:
        d.add_argument(flag, dest=field, type=typ, help=f'{help_} (default: {getattr(cnn, field)})')
    parser.add_argument('--seeds', type=int, nargs='+',
                        help='seeds protocol: one full training per seed under runs/<name>/seed<k>, then summary.md '
                             '(mean +/- std), curves.png and the global best seed (what export.py takes)')
    parser.add_argument('--lr-find', action='store_true',
                        help="run fastai's lr_find instead of training: saves <run>/lr_find.png, prints the suggestions")
    parser.add_argument('--num-workers', type=int, default=0,
                        help='DataLoader worker processes (default: %(default)s; on 2 CPU cores the model needs both)')
    parser.add_argument('--limit', type=int, help='train on a class-balanced subset of this many photos (smoke tests)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from flowers_fastai.pretrained import PretrainedUnavailable
    from flowers_fastai.training import find_lr, train

    if args.family == 'audit':
        from flowers_fastai.audit import audit_items
        from flowers_fastai.data import scan_image_folder
        try:   # several folders: one audit, so that copies across folders are found too
            print(audit_items([item for folder in args.data for item in scan_image_folder(folder).items]).report())
        except ValueError as err:
            sys.exit(f'error: {err}')
        return 0
    name = args.name or f'{args.family}-{datetime.now():%Y%m%d-%H%M%S}'
    run_dir = args.runs / name
    # what a resume must reuse: the recipe, the weights it started from, the data and the split
    settings_file = run_dir / ('experiment.json' if args.seeds else 'config.json')
    if args.resume:
        if not args.name or not settings_file.is_file():
            sys.exit(f'--resume needs the --name of a run to continue (no {settings_file})')
        from flowers_fastai.data import data_folders
        from flowers_fastai.run_folder import read_json
        try:
            settings = read_json(settings_file, 'train it again under another --name')
            if not isinstance(settings.get('recipe'), dict):
                raise ValueError('its "recipe" field is not the object of settings training writes')
            recipe, args.data = Recipe.from_dict(settings['recipe']), data_folders(settings['data'])
            pretrained = {'True': True, 'False': False}.get(str(settings['pretrained']), settings['pretrained'])
            if not isinstance(pretrained, (bool, str)) or not isinstance(settings.get('split', ''), str):
                raise ValueError('its "pretrained" or "split" field is not what training writes')
            check_recipe(recipe, source='its recipe field')
        except (ValueError, KeyError, TypeError) as err:   # RunFolderError, or fields missing / of another version
            sys.exit(f'error: {settings_file} cannot be resumed ({type(err).__name__}: {err}); '
                     'train it again under another --name')
        args.split = settings.get('split', 'stratified')
    else:
        if args.init_from:   # absolute, so that --resume finds them from anywhere
            args.init_from = str(Path(args.init_from).resolve())
        if args.teacher:
            args.teacher = tuple(str(Path(t).resolve()) for t in args.teacher)
        recipe = RECIPES[args.family].override(**{k: v for k, v in vars(args).items() if k in RECIPE_FIELDS})
        try:
            check_recipe(recipe, source='--')
        except ValueError as err:
            sys.exit(f'error: {str(err).replace("-- ", "--")}')
        if args.init_from and args.pretrained_file:
            sys.exit('error: --init-from and --pretrained-file both give the starting weights: choose one')
        pretrained = False if args.no_pretrained or args.init_from else (args.pretrained_file or True)
    print(f'Run {run_dir}: {recipe}')
    try:
        if args.lr_find:
            for rule, lr in find_lr(recipe, args.data, run_dir, pretrained=pretrained, split=args.split,
                                    num_workers=args.num_workers, limit_items=args.limit).items():
                print(f'suggested lr ({rule}): {lr:.2e}')
            print(f'plot: {run_dir / "lr_find.png"}')
            return 0
        if args.seeds:
            from dataclasses import asdict
            from flowers_fastai.experiments import run_seeds
            if not args.resume:
                run_dir.mkdir(parents=True, exist_ok=True)
                settings_file.write_text(json.dumps({'recipe': asdict(recipe), 'pretrained': str(pretrained)
                                                     if pretrained else False,
                                                     'data': [str(folder.resolve()) for folder in args.data],
                                                     'split': args.split, 'seeds': args.seeds}, indent=2))
            summary = run_seeds(recipe, args.data, run_dir, args.seeds, pretrained=pretrained, resume=args.resume,
                                num_workers=args.num_workers, limit_items=args.limit, split=args.split)
            print(f'{len(summary["seeds"])} seeds: {summary["mean"]:.4f} +/- {summary["std"]:.4f}; '
                  f'best {summary["best_run"]}; see {run_dir / "summary.md"}')
            return 0
        train(recipe, args.data, run_dir, pretrained=pretrained, resume=args.resume,
              num_workers=args.num_workers, limit_items=args.limit, split=args.split)
    except (ValueError, PretrainedUnavailable, FileExistsError, FileNotFoundError) as err:
        # DatasetError, unknown architecture or tag, no network: one sentence, before any training
        sys.exit(f'error: {err}')
    print(f'Best weights: {run_dir / "models" / "best.pth"}; export them with: python export.py --run {run_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
