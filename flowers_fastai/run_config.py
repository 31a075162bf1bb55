"""A training run's `config.json`: what it trained and on which photos, the one description every reader uses
(export, teachers, `--resume`, the scripts). Plain data, shared by both layers, like the recipes.

Written by training through `RunConfig.to_dict`, read back through `RunConfig.from_dict` (and
`run_folder.read_run_config` for a run folder): each field's default and check live here. The defaults are what
runs recorded before the field existed (older runs split `stratified`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .labels import CLASSES
from .preprocess import Preprocessing
from .recipes import Recipe

SPLITS = ('grouped', 'stratified')


@dataclass(frozen=True)
class RunConfig:
    recipe: Recipe
    preprocessing: Preprocessing      # the delivered file's: the loader's size, the weights' crop and statistics
    data: tuple[str, ...] = ()        # the photo folders, each split on its own
    split: str = 'stratified'         # 'grouped' (copies on one side) or 'stratified'
    classes: tuple[str, ...] = tuple(CLASSES)   # the order of the head's rows
    clip_spec: dict | None = None     # the ViT's tower shape (`architectures.ClipTowerSpec`), what tensors cannot tell
    pretrained: str | bool = False    # the starting weights: a published file, True (downloaded) or False
    n_train: int | None = None
    n_valid: int | None = None
    left_out_filed_under_two_classes: int = 0
    torch: str = ''                   # the torch version that trained it

    @property
    def family(self) -> str:
        return self.recipe.family

    @classmethod
    def from_dict(cls, obj: dict, where: str = 'config.json') -> RunConfig:
        """The config of `obj`, each field checked: `ValueError` naming `where` and the field. Fields this
        version does not know are ignored (a newer run's)."""
        if not isinstance(obj, dict):
            raise ValueError(f'{where} holds a JSON {type(obj).__name__}, not an object')
        recipe = obj.get('recipe')
        if not isinstance(recipe, dict) or not isinstance(recipe.get('family'), str):
            raise ValueError(f'{where} has no recipe with a model family')
        try:
            values = {'recipe': Recipe.from_dict(recipe)}
            pp = obj.get('preprocessing')
            if not isinstance(pp, dict):
                raise ValueError('field "preprocessing" must be an object (size, crop_pct, mean, std)')
            values['preprocessing'] = Preprocessing(int(pp['size']), float(pp['crop_pct']),
                                                    tuple(map(float, pp['mean'])), tuple(map(float, pp['std'])))
            data = obj.get('data', ())
            values['data'] = (data,) if isinstance(data, str) else tuple(map(str, data))
            # the other fields as recorded; `classes` as a tuple, like the dataclass's default
            values.update({f.name: tuple(obj[f.name]) if f.name == 'classes' else obj[f.name]
                           for f in fields(cls) if f.name not in values and f.name in obj})
        except (KeyError, TypeError, ValueError) as err:   # a missing key, a number where a list was written
            raise ValueError(f'{where}: {err}') from None
        config = cls(**values)
        config.check(where)
        return config

    def check(self, where: str = 'config.json') -> None:
        if self.split not in SPLITS:
            raise ValueError(f'{where}: field "split" must be one of {", ".join(SPLITS)}, not {self.split!r}')
        if list(self.classes) != CLASSES:
            raise ValueError(f'{where}: field "classes" must be {CLASSES} (the order of the head\'s rows), '
                             f'not {list(self.classes)}')
        if self.clip_spec is not None and not isinstance(self.clip_spec, dict):
            raise ValueError(f'{where}: field "clip_spec" must be an object')

    def to_dict(self) -> dict:
        """The JSON object training writes (the order of the fields above; clip_spec only for the ViT)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == 'clip_spec' and value is None:
                continue
            out[f.name] = (asdict(value) if f.name in ('recipe', 'preprocessing')
                           else list(value) if isinstance(value, tuple) else value)
        return out
