"""The sidecar: `<name>.json` beside an exported weights file, what its tensors cannot tell.

One typed description of the format, in the spirit of timm's `PretrainedCfg` and open_clip's `PreprocessCfg`:
each field the loader reads, its default (None: absent, the family's own default applies) and its check live
here, and the file is read and written only through `Sidecar.read` / `Sidecar.write`. Fields the loader does
not read (the run, the date, the calibration report, ...) are provenance: kept as written, never checked.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .delivery import DELIVERIES
from .labels import CLASSES
from .preprocess import Preprocessing

SIDECAR_MAX_BYTES = 1 << 20   # export writes ~1 KB; a sidecar of /dev/zero or 3 GB is no sidecar


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)   # JSON true is no size


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_triple(value, within) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(_is_number(x) and math.isfinite(x) and within(x) for x in value))


def _checked(valid, must_be: str, default=None):
    """A sidecar field: `valid(value)` says whether a present value may be used, `must_be` (or what it returns,
    when callable) says what it must be."""
    return field(default=default, metadata={'valid': valid, 'must_be': must_be})


@dataclass(frozen=True)
class Sidecar:
    """The settings of one exported file. A field that is present must be valid: null is not "absent"."""
    family: str | None = _checked(lambda v: isinstance(v, str) and v in DELIVERIES,
                                  lambda: ' or '.join(f'"{name}"' for name in DELIVERIES))   # families added later too
    classes: list | None = _checked(lambda v: v == CLASSES,
                                    f'the list {json.dumps(CLASSES)} (the order of the head\'s rows)')
    # a ConvNeXt divides its input by 32; above 2048 px one photo's activations would take gigabytes
    image_size: int | None = _checked(lambda v: _is_int(v) and 32 <= v <= 2048,
                                      'a whole number of pixels from 32 to 2048')
    # CLIP only: QuickGELU for OpenAI's weights (the default), GELU for OpenCLIP's; the attention head width
    quick_gelu: bool | None = _checked(lambda v: isinstance(v, bool), 'true or false')
    head_width: int | None = _checked(lambda v: _is_int(v) and v > 0, 'a positive whole number')
    # the range `calibration.fit_temperature` searches; a tinier T overflows logits / T to inf (NaN probabilities)
    temperature: float | None = _checked(lambda v: _is_number(v) and 0.01 <= v <= 100, 'a number from 0.01 to 100')
    # the preprocessing the file was trained with (export writes it from the weights' own configuration)
    crop_pct: float | None = _checked(lambda v: _is_number(v) and 0.25 <= v <= 1,
                                      'a number from 0.25 to 1 (crop size / resize)')
    mean: list | None = _checked(lambda v: _is_triple(v, lambda x: 0 <= x <= 1),
                                 'a list of 3 numbers from 0 to 1 (R, G, B)')
    std: list | None = _checked(lambda v: _is_triple(v, lambda x: 0.01 <= x <= 10),
                                'a list of 3 numbers from 0.01 to 10 (R, G, B)')
    provenance: dict = field(default_factory=dict)   # what the loader never reads, as written

    @staticmethod
    def path_for(weights_path: str | os.PathLike) -> Path:
        return Path(weights_path).with_suffix('.json')

    @classmethod
    def from_dict(cls, settings: dict, where: str = 'sidecar') -> Sidecar:
        """The fields of `settings`, each checked: `ValueError` naming `where` and the field."""
        if not isinstance(settings, dict):
            raise ValueError(f'{where} holds a JSON {type(settings).__name__}, not an object of settings')
        read = {}
        for f in fields(cls):
            if f.name in settings and f.name != 'provenance':
                value = settings[f.name]
                if not f.metadata['valid'](value):
                    must_be = f.metadata['must_be']
                    raise ValueError(f'{where}: field "{f.name}" must be '
                                     f'{must_be() if callable(must_be) else must_be}, not {short_repr(value)}')
                read[f.name] = list(value) if isinstance(value, tuple) else value
        provenance = {k: v for k, v in settings.items() if k not in read}
        return cls(**read, provenance=provenance)

    @classmethod
    def read(cls, weights_path: str | os.PathLike) -> Sidecar:
        """The sidecar beside `weights_path` (an empty one when there is none), every field checked at load, not
        a failure later: `ValueError` naming the sidecar and the field."""
        path = cls.path_for(weights_path)
        name = Path(weights_path).name
        if not path.exists():   # a directory of that name is not "no sidecar": it fails to read below
            return cls()
        try:
            data = read_small_file(path, SIDECAR_MAX_BYTES)
        except (OSError, ValueError) as err:
            raise ValueError(f'{path} (the settings beside {name}) cannot be read: {err}') from None
        try:
            settings = json.loads(data)
        except (ValueError, RecursionError) as err:   # JSON, encoding, a 5000-digit number; [[[[...]]]] nested
            raise ValueError(f'{path} (the settings beside {name}) is not valid JSON: '
                             f'{type(err).__name__}: {str(err)[:200]}') from None
        if not isinstance(settings, dict):
            raise ValueError(f'{path} (the settings beside {name}) holds a JSON {type(settings).__name__}, '
                             'not an object of settings')
        return cls.from_dict(settings, str(path))

    def to_dict(self) -> dict:
        """The JSON object: the fields that are set, then the provenance."""
        settings = {k: v for k, v in asdict(self).items() if k != 'provenance' and v is not None}
        return {**settings, **{k: v for k, v in self.provenance.items() if k not in settings}}

    def write(self, weights_path: str | os.PathLike) -> Path:
        """`<name>.json` beside `weights_path`, checked as `read` will check it (strict JSON: no NaN)."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + '\n'
        Sidecar.from_dict(json.loads(text), 'the sidecar to write')
        path = self.path_for(weights_path)
        path.write_text(text)
        return path

    def updated(self, **changes) -> Sidecar:
        """A copy with `changes`: sidecar fields by name, anything else into the provenance."""
        known = {f.name for f in fields(self)} - {'provenance'}
        return replace(self, **{k: v for k, v in changes.items() if k in known},
                       provenance={**self.provenance, **{k: v for k, v in changes.items() if k not in known}})

    def preprocessing(self, default: Preprocessing) -> Preprocessing:
        """The preprocessing the file was trained with, each field falling back to the family's `default`."""
        return Preprocessing(default.size, float(default.crop_pct if self.crop_pct is None else self.crop_pct),
                             tuple(default.mean if self.mean is None else self.mean),
                             tuple(default.std if self.std is None else self.std))

    @property
    def calibration_temperature(self) -> float:
        return 1.0 if self.temperature is None else float(self.temperature)


def short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def read_small_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; `ValueError` otherwise. Opened without blocking and
    checked on the open file, so a FIFO (whose open or read would wait for a writer for ever), a device
    (/dev/zero, /dev/urandom never end) or a huge file is refused before anything is read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f'{path} is not a regular file (a directory, pipe or device)')
        if st.st_size > max_bytes:
            raise ValueError(f'{path} is {st.st_size} bytes, over the {max_bytes} bytes such a file may have')
        with os.fdopen(fd, 'rb', closefd=False) as f:
            data = f.read(max_bytes + 1)   # a file that grew meanwhile is still cut off here
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f'{path} is over the {max_bytes} bytes such a file may have')
    return data
