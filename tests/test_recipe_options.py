"""train.py's recipe options come from the Recipe fields (flowers_fastai/recipe_options.py): one option per field,
with the help text declared once in recipes.py, and none declared by hand in train.py."""
import argparse
import subprocess
import sys
from dataclasses import dataclass, fields

import pytest

import train as train_cli
from flowers_fastai.recipe_options import NOT_OPTIONS, add_recipe_options, flag, option_fields
from flowers_fastai.recipes import RECIPES, RENAMED, VIT, Recipe

from .helpers import REPO


def _recipe_actions(parser: argparse.ArgumentParser) -> dict:
    """field name -> the parser's options that set it"""
    names = {f.name for f in fields(Recipe)}
    actions = {}
    for action in parser._actions:
        if action.dest in names:
            actions.setdefault(action.dest, []).append(action)
    return actions


def _flags(actions: dict, skip=()) -> set:
    return {(dest, tuple(a.option_strings)) for dest, options in actions.items() if dest not in skip for a in options}


def _recipe_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in train_cli.RECIPE_FIELDS and k not in NOT_OPTIONS}


def test_every_recipe_field_but_the_listed_ones_has_a_help_text():
    assert set(NOT_OPTIONS) <= {f.name for f in fields(Recipe)}
    for f in fields(Recipe):
        assert (f.name in NOT_OPTIONS) != bool(f.metadata.get('help')), f.name


def test_train_py_has_exactly_one_option_per_recipe_field_with_its_help_text():
    parser = train_cli.build_parser()
    actions = _recipe_actions(parser)
    assert set(actions) == {f.name for f in option_fields()} | {'family'}
    old_flags = {new: flag(old) for old, new in RENAMED.items()}
    for f in option_fields():
        shown = [a for a in actions[f.name] if a.help != argparse.SUPPRESS]
        hidden = [a.option_strings for a in actions[f.name] if a.help == argparse.SUPPRESS]
        assert len(shown) == 1 and shown[0].option_strings == [flag(f.name)], f.name
        assert shown[0].help.startswith(f.metadata['help'] + ' (default: '), f.name
        assert hidden == ([[old_flags[f.name]]] if f.name in old_flags else []), f.name
    # train.py declares no recipe option itself: its recipe options are exactly the generated ones
    bare = argparse.ArgumentParser()
    add_recipe_options(bare)
    assert _flags(actions, skip=NOT_OPTIONS) == _flags(_recipe_actions(bare))
    parser.format_help()   # a help text argparse cannot format (a stray %) fails here, not on a user's --help


@pytest.mark.parametrize('family', sorted(RECIPES))
def test_an_option_left_out_is_none_and_keeps_the_familys_default(family):
    parsed = _recipe_args(train_cli.parse_args([family]))
    assert set(parsed) == {f.name for f in option_fields()} and set(parsed.values()) == {None}
    assert RECIPES[family].override(**parsed) == RECIPES[family]


def test_every_recipe_option_reads_its_fields_type():
    """Each field given on the command line as a recipe holds it: ints stay ints, floats floats, paths a tuple."""
    wanted = VIT.override(teacher=('t0', 't1'), init_from='w.pth')
    argv = ['cnn']
    for f in option_fields():
        value = getattr(wanted, f.name)
        argv += [flag(f.name), *(value if isinstance(value, tuple) else [str(value)])]
    got = RECIPES['cnn'].override(**_recipe_args(train_cli.parse_args(argv)))
    assert got == wanted.override(family='cnn')
    for f in option_fields():
        assert type(getattr(got, f.name)) is type(getattr(wanted, f.name)), f.name


def test_a_recipe_field_added_without_a_help_text_is_refused(monkeypatch):
    from flowers_fastai import recipe_options

    @dataclass(frozen=True)
    class Extended(Recipe):
        undocumented: int = 0
    monkeypatch.setattr(recipe_options, 'Recipe', Extended)
    with pytest.raises(TypeError, match='Recipe field undocumented needs a help text'):
        add_recipe_options(argparse.ArgumentParser())


def test_train_help_reads_without_importing_fastai():
    code = ('import sys, train; train.build_parser().format_help(); '
            'assert "fastai" not in sys.modules, "fastai imported"')
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)
