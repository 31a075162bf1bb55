"""train.py's recipe options, made from the `Recipe` fields: a field's help text (and its help section) is declared
once, as the field's metadata in recipes.py, so a new field is an option without a second declaration here or in
train.py. Importing this module does not import fastai: `train.py --help` stays quick."""
from __future__ import annotations

import argparse
from dataclasses import Field, fields

from .recipes import RECIPES, RENAMED, Recipe

NOT_OPTIONS = ('family',)   # the Recipe fields that are no option: the family is train.py's positional argument

# Help sections, by a field's `group` metadata ('recipe' when it has none). One value in a "(default: ...)" means
# every family has it.
GROUPS = {'recipe': f'recipe (defaults: {" / ".join(RECIPES)}, from flowers_fastai/recipes.py)',
          'distillation': 'knowledge distillation (cnn, vit)'}

# How each field type is read from the command line (recipes.py postpones annotations: they are strings)
ARGUMENTS_BY_TYPE = {'int': dict(type=int), 'float': dict(type=float), 'str': dict(type=str),
                     'tuple[str, ...]': dict(nargs='+')}


def option_fields() -> list[Field]:
    return [f for f in fields(Recipe) if f.name not in NOT_OPTIONS]


def flag(field_name: str) -> str:
    return '--' + field_name.replace('_', '-')


def defaults_text(field_name: str) -> str:
    """The field's value in each family's recipe ('cnn / vit / teacher'), or one value when they agree."""
    shown = ['none' if getattr(recipe, field_name) in ('', ()) else str(getattr(recipe, field_name))
             for recipe in RECIPES.values()]
    return shown[0] if len(set(shown)) == 1 else ' / '.join(shown)


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """One option per recipe field, `--field-name`, and a hidden one under each old name in RENAMED. Every option
    defaults to None, "the family's value": `Recipe.override` keeps a field whose option is None."""
    sections = {group: parser.add_argument_group(title) for group, title in GROUPS.items()}
    old_flags = {new: flag(old) for old, new in RENAMED.items()}
    for f in option_fields():
        if not f.metadata.get('help') or f.type not in ARGUMENTS_BY_TYPE:
            raise TypeError(f'Recipe field {f.name} needs a help text (recipes.option) and a type train.py can read '
                            f'({", ".join(ARGUMENTS_BY_TYPE)}), or a place in recipe_options.NOT_OPTIONS')
        section, how = sections[f.metadata.get('group', 'recipe')], ARGUMENTS_BY_TYPE[f.type]
        section.add_argument(flag(f.name), dest=f.name, default=None,
                             help=f'{f.metadata["help"]} (default: {defaults_text(f.name)})', **how)
        if f.name in old_flags:   # command lines written before the rename keep working
            section.add_argument(old_flags[f.name], dest=f.name, default=None, help=argparse.SUPPRESS, **how)
