"""Train a flower classifier with fastai: `python train.py cnn|vit --data DIR [options]`.

Defaults are the brief's recipes (flowers_fastai/recipes.py); every option below overrides one of them.
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

from flowers_fastai.recipe_options import add_recipe_options
from flowers_fastai.recipes import RECIPES, Recipe, check_recipe

RECIPE_FIELDS = {f.name for f in fields(Recipe)}   # the options that override the recipe (the others steer the run)
DEFAULT_DATA = Path(__file__).resolve().parent.parent / 'shared' / 'data' / 'flowers'


def build_parser() -> argparse.ArgumentParser:
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

    add_recipe_options(parser)   # one option per Recipe field, its help text from recipes.py
    parser.add_argument('--split', choices=['grouped', 'stratified'], default='grouped',
                        help='grouped: stratified, with copies of a photo on one side and photos filed under two '
                             'classes left out (see `train.py audit`); stratified: photos split independently '
                             '(default: %(default)s)')
    parser.add_argument('--seeds', type=int, nargs='+',
                        help='seeds protocol: one full training per seed under runs/<name>/seed<k>, then summary.md '
                             '(mean +/- std), curves.png and the global best seed (what export.py takes)')
    parser.add_argument('--lr-find', action='store_true',
                        help="run fastai's lr_find instead of training: saves <run>/lr_find.png, prints the suggestions")
    parser.add_argument('--num-workers', type=int, default=0,
                        help='DataLoader worker processes (default: %(default)s; on 2 CPU cores the model needs both)')
    parser.add_argument('--limit', type=int, help='train on a class-balanced subset of this many photos (smoke tests)')
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
        from flowers_fastai.run_folder import read_json, read_run_config
        todo = 'train it again under another --name'
        try:
            if args.seeds:   # experiment.json: the seeds' common settings (recipe, pretrained, data, split)
                settings = read_json(settings_file, todo)
                if not isinstance(settings.get('recipe'), dict):
                    raise ValueError('its "recipe" field is not the object of settings training writes')
                recipe, data = Recipe.from_dict(settings['recipe']), settings['data']
                saved_pretrained, split = settings['pretrained'], settings.get('split', 'stratified')
            else:
                config = read_run_config(run_dir, todo)
                recipe, data, saved_pretrained, split = config.recipe, list(config.data), config.pretrained, config.split
            args.data = data_folders(data)
            pretrained = {'True': True, 'False': False}.get(str(saved_pretrained), saved_pretrained)
            if not isinstance(pretrained, (bool, str)) or not isinstance(split, str):
                raise ValueError('its "pretrained" or "split" field is not what training writes')
            check_recipe(recipe, source='its recipe field')
        except (ValueError, KeyError, TypeError) as err:   # RunFolderError, or fields missing / of another version
            sys.exit(f'error: {settings_file} cannot be resumed ({type(err).__name__}: {err}); {todo}')
        args.split = split
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
