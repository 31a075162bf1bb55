"""Published pretrained weights: downloaded through timm / open_clip when online, read from a local file offline.

Both paths end in the same loader, which checks every backbone key: only the 5-class head may be new.

Formats read from a local file:
- ConvNeXt V2: timm's `model.safetensors` / `pytorch_model.bin` (timm key names) and the original
  Facebook `.pt` checkpoints (converted by timm's own `checkpoint_filter_fn`).
- CLIP: OpenAI's TorchScript `.pt` archive or a plain state-dict `.pt`, and open_clip's
  `open_clip_pytorch_model.bin` / `open_clip_model.safetensors`; only the `visual.` tower is used.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import socket
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .architectures import ArchitectureError, ClipClassifier, load_exactly
from .weights_io import UnreadableFile, read_torch_file

DEFAULT_CNN_TAG = 'fcmae_ft_in22k_in1k'
DEFAULT_CLIP_TAG = 'openai'


class PretrainedUnavailable(RuntimeError):
    """The published weights could not be downloaded and no local file was given."""


def _offline_message(what: str, err: Exception) -> str:
    return (f'Could not download the pretrained weights {what} ({type(err).__name__}: {err}). '
            'Either pass --pretrained-file PATH with a local copy of the published file, '
            'or --no-pretrained to train from scratch.')


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """One TCP connection to the host of `url`. Without it, huggingface_hub retries a dead network with
    ~25 s of back-off per file before failing; this answers in at most `timeout` seconds."""
    parts = urlparse(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_download(repo_id: str, filenames: list[str], what: str) -> Path:
    """The first of `filenames` in the Hugging Face repo `repo_id`: downloaded when the hub is reachable,
    else from the local cache, else `PretrainedUnavailable`."""
    from huggingface_hub import constants, hf_hub_download
    local_only = not _reachable(constants.ENDPOINT)
    error = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
        except Exception as err:  # any hub / network failure: try the next name, report the last one
            error = err
    raise PretrainedUnavailable(_offline_message(f'{what} from the Hugging Face hub', error)) from error


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors, a torch state-dict file, a training checkpoint
    ({'state_dict': ...} / {'model': ...}, 'module.' prefixes) or a TorchScript archive (OpenAI CLIP)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'pretrained weights file not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device='cpu')
        except Exception as err:   # safetensors' own error type, for a truncated or foreign file
            raise ArchitectureError(f'pretrained file {path} cannot be read (truncated download?: '
                                    f'{type(err).__name__}: {_first_line(err)}); download it again') from None
    if zipfile.is_zipfile(path) and any(n.endswith('constants.pkl') for n in zipfile.ZipFile(path).namelist()):
        # OpenAI's published CLIP files are TorchScript archives: their tensors are read, their code never runs
        return read_torchscript_tensors(path)
    try:
        obj = read_torch_file(path)
    except UnreadableFile as err:
        if err.kind == 'runs_code':
            raise ArchitectureError(f'pretrained file {path} is refused: it is a pickle that would need to run code '
                                    f'to load ({err.detail}); give the published weights file') from None
        raise ArchitectureError(f'pretrained file {path} cannot be read (truncated download, or not a weights file?: '
                                f'{err.detail}); download it again') from None
    for key in ('state_dict', 'model', 'model_ema'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ArchitectureError(f'{path} holds a {type(obj).__name__}, not a state_dict')
    return {k.removeprefix('module.'): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(err: Exception) -> str:
    """What went wrong, in one line: for torch's weights_only refusal the line naming what was refused (its first
    line advises `weights_only=False`, the very thing not to do), without terminal colour codes."""
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(err)).strip()
    for line in text.splitlines():
        if 'WeightsUnpickler error:' in line:
            return line.split('WeightsUnpickler error:', 1)[1].strip()
    return text.splitlines()[0] if text else type(err).__name__


class _ScriptObject:
    """Stands in for every TorchScript class (`__torch__.*`) of an archive: only its attributes are kept."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


# torch.jit._pickle's helpers tag lists of module attributes (a conv's stride...): each returns its argument
_JIT_PICKLE_HELPERS = ('build_intlist', 'build_tensorlist', 'build_doublelist', 'build_boollist', 'restore_type_tag')


class _TorchScriptUnpickler(pickle.Unpickler):
    """The archive's data.pkl with an allow-list of globals: tensors, their storages, OrderedDict and stand-ins
    for its modules. `torch.jit.load` would also run the archive's TorchScript code (`__setstate__` methods); a
    Python global outside the list (`os.system`...) is refused before anything is called."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return _ScriptObject
        if (module, name) in (('torch._utils', '_rebuild_tensor_v2'), ('collections', 'OrderedDict')) or (
                module == 'torch.jit._pickle' and name in _JIT_PICKLE_HELPERS):
            return getattr(__import__(module, fromlist=[name]), name)
        if module == 'torch' and name.endswith('Storage') and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f'global {module}.{name} is not allowed in a weights file')

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != 'storage':
            raise pickle.UnpicklingError(f'unknown persistent id {kind!r}')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')   # TypedStorage deprecation: it is what torch's own loader builds
            dtype = storage_type.dtype
        data = self.archive.read(f'{self.prefix}data/{key}')
        if len(data) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f'storage {key} holds {len(data)} bytes, not {numel} x {dtype}')
        storage = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of a TorchScript archive's modules (parameters and buffers, as `torch.jit.load(path)
    .state_dict()` names them), read without running any of the archive's code."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            data_pkl = next(n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1)
            root = _TorchScriptUnpickler(io.BytesIO(archive.read(data_pkl)), archive,
                                         data_pkl[:-len('data.pkl')]).load()
    except pickle.UnpicklingError as err:
        raise ArchitectureError(f'pretrained file {path} is refused: {_first_line(err)}; give the published weights '
                                'file') from None
    except (StopIteration, KeyError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError, AttributeError,
            IndexError, RuntimeError) as err:
        raise ArchitectureError(f'pretrained file {path} is not a readable TorchScript archive (truncated download?: '
                                f'{type(err).__name__}: {_first_line(err)}); download it again') from None
    tensors, seen = {}, set()

    def collect(obj, prefix):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                collect(value, f'{prefix}{name}.')
    if not isinstance(root, _ScriptObject):
        raise ArchitectureError(f'pretrained file {path} holds no TorchScript module')
    collect(root, '')
    return tensors


# ---------------------------------------------------------------------------------------------- CNN
def cnn_pretrained_file(arch: str, tag: str = DEFAULT_CNN_TAG) -> Path:
    """Download (or find in the Hugging Face cache) timm's published weights for `arch.tag`."""
    import timm
    name = f'{arch}.{tag}'
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm raises for a tag it does not know (e.g. convnextv2_atto has no in22k tags)
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(f'timm publishes no weights named {name!r}; its tags for {arch}: '
                         + ', '.join(n.split('.', 1)[1] for n in timm.list_pretrained(f'{arch}.*')))
    return hub_download(cfg.hf_hub_id, [cfg.hf_hub_filename or 'model.safetensors'], name)


def load_cnn_backbone(model: nn.Module, path: str | Path) -> None:
    """Load a published ConvNeXt V2 checkpoint into `model`, keeping its fresh 5-class head."""
    from timm.models.convnext import checkpoint_filter_fn
    state = read_checkpoint(path)
    # Facebook's pointwise layers are nn.Linear (2-D), timm's ConvNeXt V2 has 1x1 convs: shaping them here keeps
    # timm's converter from reshaping to the model's shape, which fails obscurely for a file of another size.
    state = {k: v[:, :, None, None] if v.ndim == 2 and re.search(r'\.pwconv[12]\.weight$', k) else v
             for k, v in state.items()}
    state = checkpoint_filter_fn(state, model)  # converts Facebook's original key names
    state = {k: v for k, v in state.items() if not k.startswith('head.fc.')}
    head = {k: v for k, v in model.state_dict().items() if k.startswith('head.fc.')}
    load_exactly(model, {**state, **head}, f'pretrained file {path}')


# ---------------------------------------------------------------------------------------------- ViT
def clip_pretrained_file(model_name: str, tag: str = DEFAULT_CLIP_TAG) -> Path:
    """Download (or find in the cache) open_clip's published weights for `model_name` / `tag`."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name, tag)
    what = f'{model_name} / {tag}'
    if not cfg:
        raise ValueError(f'open_clip publishes no weights {tag!r} for {model_name!r}')
    if cfg.get('hf_hub'):
        # open_clip's convention: 'org/name/' (its default file names, safetensors first) or 'org/name/file'
        repo_id, filename = os.path.split(cfg['hf_hub'])
        names = [filename] if filename else ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
        return hub_download(repo_id, names, what)
    if not _reachable(cfg['url']):
        raise PretrainedUnavailable(_offline_message(f'{what} from {cfg["url"]}', OSError('host unreachable')))
    try:
        return Path(download_pretrained(cfg))
    except Exception as err:  # any network failure: one clear sentence with both ways out
        raise PretrainedUnavailable(_offline_message(what, err)) from err


def load_clip_backbone(model: ClipClassifier, path: str | Path) -> None:
    """Load the image tower of a published CLIP checkpoint into `model.visual`, keeping the fresh head."""
    state = read_checkpoint(path)
    visual = {k: v for k, v in state.items() if k.startswith('visual.')}
    if not visual:
        raise ArchitectureError(f'{path} holds no CLIP image tower (no "visual." keys)')
    head = {k: v for k, v in model.state_dict().items() if k.startswith('head.')}
    load_exactly(model, {**visual, **head}, f'pretrained file {path}')
