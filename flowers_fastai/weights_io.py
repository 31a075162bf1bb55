"""One reader for every torch file this project opens: delivered weights (`submit`), a run's checkpoints
(`run_folder`, `teachers`) and published pretrained files (`pretrained`).

`read_torch_file` never runs code from a file (`torch.load(weights_only=True)`), never lets a file make it
allocate more than the file holds, reads into memory the process owns (not memory-mapped: a loaded model must
not change, or die of SIGBUS, when its file is truncated or overwritten later), and turns every way a file can
be unreadable into one `UnreadableFile` whose `kind` says which. Each caller phrases that for its own user.
"""
from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

class UnreadableFile(ValueError):
    """A torch file that cannot be read. `kind` is one of:
    - 'oversized': its archive or pickle declares more bytes than the file holds (crafted or damaged);
    - 'fastai_export': a fastai `learn.export()` pickle, not a state_dict;
    - 'runs_code': a pickle that would need to run code to load (refused, nothing ran);
    - 'not_torch': a pickle, but no torch file;
    - 'unreadable': truncated, or bytes of another format.
    `detail`: one line, what torch or the scan said."""

    def __init__(self, path: Path, kind: str, detail: str):
        super().__init__(f'{path}: {kind}: {detail}')
        self.path, self.kind, self.detail = path, kind, detail


def unpickling_reason(err: Exception) -> str:
    """The line of torch's weights_only refusal that says what was refused (its first line advises
    `weights_only=False`, which is exactly what must not be done), without terminal colour codes."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(err))
    for line in text.splitlines():
        if 'WeightsUnpickler error:' in line:
            return line.split('WeightsUnpickler error:', 1)[1].strip()
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ''


def read_torch_file(path: str | Path, safe_globals: list | tuple = (), map_location='cpu'):
    """The object in the torch file at `path`, read with `weights_only=True` (plus `safe_globals`, classes the
    caller trusts because they hold data and run no code). `UnreadableFile` for anything else."""
    path = Path(path)
    try:
        _check_declared_sizes(path)
    except _Oversized as err:
        raise UnreadableFile(path, 'oversized', str(err)) from None
    except Exception:   # noqa: BLE001 - what the scan cannot follow, torch.load refuses below with its own reason
        pass
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if 'fastai' in str(err):
            raise UnreadableFile(path, 'fastai_export', _first_line(err)) from None
        if 'Unsupported global' in str(err) or 'Weights only load failed' in str(err):
            raise UnreadableFile(path, 'runs_code', unpickling_reason(err)) from None
        raise UnreadableFile(path, 'not_torch', _first_line(err)) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, AttributeError,
            IndexError, TypeError, RecursionError, struct.error) as err:
        # torch raises these for truncated archives and for bytes that are no torch file at all
        raise UnreadableFile(path, 'unreadable', f'{type(err).__name__}: {_first_line(err)}') from None


_ELEMENT_BYTES = {'Double': 8, 'Float': 4, 'Half': 2, 'BFloat16': 2, 'Long': 8, 'Int': 4, 'Short': 2, 'Char': 1,
                  'Byte': 1, 'Bool': 1, 'ComplexFloat': 8, 'ComplexDouble': 16, 'Untyped': 1}


class _Stub:
    """Whatever a scanned pickle names: built from any arguments, holding nothing (no real global is looked up)."""
    element_bytes = 8

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):   # an OrderedDict's items
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _SizeScanner(pickle.Unpickler):
    """Reads a torch pickle without building anything, adding up the bytes its storages declare: torch allocates
    each storage at the size the pickle declares before reading its bytes, so a tiny crafted file could make
    it allocate gigabytes."""

    def __init__(self, file):
        super().__init__(file)
        self.declared, self._stubs = 0, {}

    def find_class(self, module, name):
        if name not in self._stubs:
            kind = name[:-len('Storage')] if name.endswith('Storage') else None
            self._stubs[name] = type(name, (_Stub,), {'element_bytes': _ELEMENT_BYTES.get(kind, 8)})
        return self._stubs[name]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ('storage', b'storage'):
            storage_type, numel = pid[1], pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise ValueError(f'a storage declares {repr(numel)[:60]} elements')
            self.declared += numel * getattr(storage_type, 'element_bytes', 8)
        return _Stub()


MAX_PICKLE_BYTES = 64 << 20   # the pickle part of a weights file: a few hundred KB for ViT-L


def _check_declared_sizes(path: Path) -> None:
    """Refuse, before torch reads anything, a file whose archive or pickle declares more bytes than the file holds
    (`torch.save` writes every storage uncompressed): loading then never takes much more than the file's size."""
    size = path.stat().st_size
    with path.open('rb') as f:
        is_zip = f.read(4) == b'PK\x03\x04'
        f.seek(0)
        if is_zip:
            with zipfile.ZipFile(f) as archive:
                entries = archive.infolist()
                for entry in entries:
                    if entry.file_size > size:
                        raise _Oversized(f'{entry.filename} declares {entry.file_size} bytes in a file of {size}')
                pickles = [e for e in entries if e.filename.endswith('/data.pkl') or e.filename == 'data.pkl']
                if len(pickles) != 1 or pickles[0].file_size > MAX_PICKLE_BYTES:
                    return   # no torch archive: torch.load says so
                with archive.open(pickles[0]) as data:
                    scanner = _SizeScanner(data)
                    scanner.load()
        else:   # the legacy format: magic number, protocol, system info, then the pickle that declares storages
            for _ in range(3):
                _SizeScanner(f).load()
            scanner = _SizeScanner(f)
            scanner.load()
    if scanner.declared > size:
        raise _Oversized(f'its tensors declare {scanner.declared} bytes in a file of {size}')


class _Oversized(ValueError):
    """A file that declares more bytes than it holds."""
