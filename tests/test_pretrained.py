"""Published pretrained weights: local files in the exact published formats, the offline download path, and
architecture inference.

No model hub is reachable here and no package carries ConvNeXt V2 or CLIP weights, so every file below is a
stand-in written in the published layout from a randomly initialised model (every tensor randomised, so that
no value can coincide with a fresh initialisation). Each load must bring every backbone tensor over unchanged
and leave only the 5-class head new. A crafted pretrained file (a torch zip, a plain pickle, a TorchScript
archive) is refused without running its code, and TorchScript archives are read without torch.jit.load.
"""
from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_fastai import architectures, pretrained
from flowers_fastai.architectures import (ArchitectureError, CONVNEXTV2_SIZES, ClipClassifier, build_clip_tower,
                                          build_cnn, clip_spec_from_open_clip, infer_clip_spec,
                                          infer_cnn_arch)
from flowers_fastai.delivery import delivery_of
from flowers_fastai.labels import CLASSES
from flowers_fastai.models import create_model
from flowers_fastai.recipes import RECIPES

from .helpers import (RunsCode, crafted_torch_file, randomized, timm_convnextv2_source, timm_to_fb,
                      write_cnn_file)

CNN_ATTO = RECIPES['cnn'].override(arch='convnextv2_atto')
ATTO_DEPTHS, ATTO_DIMS = CONVNEXTV2_SIZES['atto']


# ============================================================================================ ConvNeXt V2
def fb_key_names(depths, with_head: bool = True) -> set[str]:
    """The key names of Facebook's original ConvNeXt-V2 `model` (facebookresearch/ConvNeXt-V2 models/convnextv2.py),
    written out independently of timm."""
    keys = {'downsample_layers.0.0.weight', 'downsample_layers.0.0.bias',   # stem conv
            'downsample_layers.0.1.weight', 'downsample_layers.0.1.bias'}   # stem LayerNorm
    for i in range(1, 4):
        keys |= {f'downsample_layers.{i}.{j}.{p}' for j in (0, 1) for p in ('weight', 'bias')}  # LayerNorm, conv
    for s, depth in enumerate(depths):
        for b in range(depth):
            keys |= {f'stages.{s}.{b}.{m}.{p}' for m in ('dwconv', 'norm', 'pwconv1', 'pwconv2')
                     for p in ('weight', 'bias')}
            keys |= {f'stages.{s}.{b}.grn.gamma', f'stages.{s}.{b}.grn.beta'}
    keys |= {'norm.weight', 'norm.bias'}
    if with_head:
        keys |= {'head.weight', 'head.bias'}
    return keys


@pytest.fixture(scope='module')
def atto_source() -> dict[str, torch.Tensor]:
    return timm_convnextv2_source('convnextv2_atto', seed=11)


def test_fb_layout_helper_is_facebooks_layout_and_timm_reads_it_back(atto_source):
    """The stand-in FB file really has Facebook's names and GRN shapes, and timm's own converter maps it back."""
    from timm.models.convnext import checkpoint_filter_fn
    fb = timm_to_fb(atto_source)
    assert set(fb) == fb_key_names(ATTO_DEPTHS)
    assert fb['stages.0.0.grn.gamma'].shape == (1, 1, 1, 4 * ATTO_DIMS[0])   # GRN sits on the 4C hidden layer
    assert fb['stages.3.1.grn.beta'].shape == (1, 1, 1, 4 * ATTO_DIMS[3])
    assert fb['stages.1.0.pwconv1.weight'].shape == (4 * ATTO_DIMS[1], ATTO_DIMS[1])  # nn.Linear in FB's Block
    assert fb['stages.1.0.pwconv2.weight'].shape == (ATTO_DIMS[1], 4 * ATTO_DIMS[1])
    assert fb['stages.2.0.dwconv.weight'].shape == (ATTO_DIMS[2], 1, 7, 7)
    assert fb['downsample_layers.2.1.weight'].shape == (ATTO_DIMS[2], ATTO_DIMS[1], 2, 2)
    assert fb['head.weight'].shape == (1000, ATTO_DIMS[3])
    assert fb['downsample_layers.0.0.weight'].shape == (ATTO_DIMS[0], 3, 4, 4)
    back = checkpoint_filter_fn({'model': fb}, build_cnn('convnextv2_atto'))
    assert set(back) == set(atto_source)
    assert all(torch.equal(back[k], v) for k, v in atto_source.items())


@pytest.mark.parametrize('fmt', ['safetensors', 'bin', 'pth', 'fb'])
def test_cnn_local_file_loads_every_backbone_tensor_and_a_new_head(fmt, atto_source, tmp_path):
    path = write_cnn_file(atto_source, tmp_path, fmt)
    torch.manual_seed(5)
    scratch = create_model(CNN_ATTO, pretrained=False).state_dict()
    torch.manual_seed(5)
    model = create_model(CNN_ATTO, pretrained=path)
    loaded = model.state_dict()

    assert set(loaded) == set(atto_source)
    backbone = [k for k in loaded if not k.startswith('head.fc.')]
    assert len(backbone) == len(loaded) - 2
    assert 'head.norm.weight' in backbone    # the pre-logits LayerNorm is pretrained too (FB: 'norm.')
    for k in backbone:
        assert loaded[k].dtype == atto_source[k].dtype
        assert torch.equal(loaded[k], atto_source[k]), f'{k} changed on the way in ({fmt})'
    # the head: 5 x 320, freshly initialised (exactly what the same seed gives without weights), not from the file
    assert model.head.fc.weight.shape == (len(CLASSES), ATTO_DIMS[3])
    assert model.head.fc.bias.shape == (len(CLASSES),)
    for k in ('head.fc.weight', 'head.fc.bias'):
        assert torch.equal(loaded[k], scratch[k])
    assert not torch.equal(loaded['head.fc.weight'], atto_source['head.fc.weight'][:len(CLASSES)])
    # the model works
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, len(CLASSES))


@pytest.mark.parametrize('fmt', ['safetensors', 'pth', 'fb'])
def test_cnn_file_of_another_size_is_refused_with_the_mismatch(fmt, tmp_path):
    femto = timm_convnextv2_source('convnextv2_femto', seed=12)
    path = write_cnn_file(femto, tmp_path, fmt)
    with pytest.raises(ValueError) as info:
        create_model(CNN_ATTO, pretrained=path)
    assert isinstance(info.value, ArchitectureError)
    message = str(info.value)
    assert str(path) in message
    assert 'stem.0.weight' in message and '48' in message and '40' in message, message


@pytest.mark.parametrize('fmt', ['safetensors', 'fb'])
def test_cnn_file_of_another_depth_is_refused(fmt, tmp_path):
    nano = timm_convnextv2_source('convnextv2_nano', seed=13)   # 8 blocks in stage 2 instead of 6, wider
    path = write_cnn_file(nano, tmp_path, fmt)
    with pytest.raises(ArchitectureError, match='does not fit the network'):
        create_model(CNN_ATTO, pretrained=path)


@pytest.mark.parametrize('fmt', ['safetensors', 'bin', 'fb'])
@pytest.mark.parametrize('drop', ['stages.2.blocks.5.mlp.grn.weight', 'stages.1.downsample.1.weight',
                                  'head.norm.bias'])
def test_cnn_file_missing_a_backbone_tensor_is_refused(fmt, drop, atto_source, tmp_path):
    incomplete = {k: v for k, v in atto_source.items() if k != drop}
    path = write_cnn_file(incomplete, tmp_path, fmt)
    with pytest.raises(ArchitectureError) as info:
        create_model(CNN_ATTO, pretrained=path)
    assert 'missing' in str(info.value) and drop in str(info.value)


def test_cnn_file_with_an_unknown_tensor_is_refused(atto_source, tmp_path):
    path = write_cnn_file({**atto_source, 'stages.0.blocks.0.gamma': torch.ones(ATTO_DIMS[0])}, tmp_path, 'bin')
    with pytest.raises(ArchitectureError, match=r'unexpected keys: stages\.0\.blocks\.0\.gamma'):
        create_model(CNN_ATTO, pretrained=path)


def test_cnn_file_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.safetensors'):
        create_model(CNN_ATTO, pretrained=tmp_path / 'nothing.safetensors')


# ============================================================================================ CLIP
@pytest.fixture(scope='module')
def clip_model(tiny_clip_name):
    """The full open_clip CLIP model (image and text towers) of the tiny config, every tensor random."""
    import open_clip
    model = open_clip.create_model(tiny_clip_name, pretrained=None)
    model.load_state_dict(randomized(model.state_dict(), seed=21))
    return model.eval()


@pytest.fixture(scope='module')
def clip_source(clip_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in clip_model.state_dict().items()}


def openai_torchscript(clip_model, path: Path, half: bool) -> dict[str, torch.Tensor]:
    """An OpenAI-style TorchScript archive of the whole CLIP model (their published .pt files are these, in
    fp16, with input_resolution / context_length / vocab_size stored beside the weights)."""
    import copy
    model = copy.deepcopy(clip_model)
    if half:
        model = model.half()
    for name, value in (('input_resolution', 32), ('context_length', 77), ('vocab_size', 49408)):
        if not hasattr(model, name):   # open_clip's CLIP already has context_length / vocab_size attributes
            model.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(model), str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_clip_file(clip_model, folder: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The model in one published format; returns the file and the tensors it holds (its own names)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in clip_model.state_dict().items()}
    if fmt == 'openai_state_dict':
        path = folder / 'ViT-FlowersTest.pt'
        torch.save(state, path)
    elif fmt in ('openai_torchscript', 'openai_torchscript_fp16'):
        path = folder / 'ViT-FlowersTest.pt'
        state = openai_torchscript(clip_model, path, half=fmt.endswith('fp16'))
    elif fmt == 'open_clip_bin':
        path = folder / 'open_clip_pytorch_model.bin'
        torch.save(state, path)
    elif fmt == 'open_clip_safetensors':
        from safetensors.torch import save_file
        path = folder / 'open_clip_model.safetensors'
        save_file(state, str(path))
    elif fmt == 'train_checkpoint':   # open_clip's training script: epoch_N.pt, DDP 'module.' prefixes
        path = folder / 'epoch_10.pt'
        torch.save({'epoch': 10, 'name': 'run', 'state_dict': {'module.' + k: v for k, v in state.items()},
                    'optimizer': {'state': {}, 'param_groups': []}}, path)
    else:
        raise AssertionError(fmt)
    return path, state


def vit_recipe(tiny_clip_name):
    return RECIPES['vit'].override(arch=tiny_clip_name, size=32)


CLIP_FORMATS = ['openai_state_dict', 'openai_torchscript', 'openai_torchscript_fp16', 'open_clip_bin',
                'open_clip_safetensors', 'train_checkpoint']


@pytest.mark.parametrize('fmt', CLIP_FORMATS)
def test_clip_local_file_loads_the_whole_image_tower_and_a_new_head(fmt, clip_model, clip_source, tiny_clip_name,
                                                                      tmp_path):
    path, written = write_clip_file(clip_model, tmp_path, fmt)
    if fmt.startswith('openai_torchscript'):
        import zipfile
        assert any(n.endswith('constants.pkl') for n in zipfile.ZipFile(path).namelist())  # a real TorchScript archive
    recipe = vit_recipe(tiny_clip_name)
    torch.manual_seed(7)
    scratch = create_model(recipe, pretrained=False).state_dict()
    torch.manual_seed(7)
    model = create_model(recipe, pretrained=path)
    loaded = model.state_dict()

    source_visual = {k: v for k, v in written.items() if k.startswith('visual.')}
    assert len(source_visual) == len([k for k in clip_source if k.startswith('visual.')]) > 0
    assert set(loaded) == set(source_visual) | {'head.weight', 'head.bias'}
    for k, v in source_visual.items():
        assert loaded[k].dtype == torch.float32
        assert torch.equal(loaded[k], v.float()), f'{k} changed on the way in ({fmt})'
        if not fmt.endswith('fp16'):
            assert torch.equal(loaded[k], clip_source[k])
    embed_dim = clip_model.visual.output_dim
    assert model.head.weight.shape == (len(CLASSES), embed_dim)
    assert torch.equal(loaded['head.weight'], scratch['head.weight'])
    assert torch.equal(loaded['head.bias'], scratch['head.bias'])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, len(CLASSES))
    # the tower computes what the published CLIP image encoder computes (fp32 files: bit for bit the same maths)
    if not fmt.endswith('fp16'):
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.visual(x), clip_model.encode_image(x))


def test_clip_file_without_image_tower_is_refused(clip_source, tiny_clip_name, tmp_path):
    path = tmp_path / 'text_only.pt'
    torch.save({k: v for k, v in clip_source.items() if not k.startswith('visual.')}, path)
    with pytest.raises(ValueError, match='no CLIP image tower'):
        create_model(vit_recipe(tiny_clip_name), pretrained=path)
    cnn = tmp_path / 'model.safetensors'
    from safetensors.torch import save_file
    save_file(timm_convnextv2_source('convnextv2_atto', seed=3), str(cnn))
    with pytest.raises(ArchitectureError, match='no CLIP image tower'):
        create_model(vit_recipe(tiny_clip_name), pretrained=cnn)


def test_clip_file_missing_a_tower_tensor_or_of_another_size_is_refused(clip_source, tiny_clip_name, tmp_path):
    drop = 'visual.transformer.resblocks.1.mlp.c_proj.weight'
    path = tmp_path / 'incomplete.pt'
    torch.save({k: v for k, v in clip_source.items() if k != drop}, path)
    with pytest.raises(ArchitectureError) as info:
        create_model(vit_recipe(tiny_clip_name), pretrained=path)
    assert 'missing' in str(info.value) and drop in str(info.value)

    wider = build_clip_tower(architectures.ClipTowerSpec(image_size=32, patch_size=8, width=96, layers=2,
                                                         output_dim=32, head_width=32))   # 96 wide, not 64
    path = tmp_path / 'other.pt'
    torch.save({'visual.' + k: v for k, v in wider.state_dict().items()}, path)
    with pytest.raises(ArchitectureError, match='shape mismatches: visual'):
        create_model(vit_recipe(tiny_clip_name), pretrained=path)


# ============================================================================================ online, offline
@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Hugging Face / torch caches in an empty folder, so that a copy already downloaded on this machine cannot
    answer instead of the (blocked) network. huggingface_hub reads HF_HOME at import: its constants too."""
    import huggingface_hub.constants as hf_constants
    cache = tmp_path / 'cache'
    for var, sub in (('HF_HOME', 'huggingface'), ('HF_HUB_CACHE', 'huggingface/hub'), ('TORCH_HOME', 'torch'),
                     ('XDG_CACHE_HOME', '')):
        monkeypatch.setenv(var, str(cache / sub))
    monkeypatch.setattr(hf_constants, 'HF_HOME', str(cache / 'huggingface'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache / 'huggingface/hub'))
    monkeypatch.setattr(hf_constants, 'HUGGINGFACE_HUB_CACHE', str(cache / 'huggingface/hub'))
    return cache


class _NoBackoffSleep:
    """huggingface_hub's `time` module with `sleep` recorded instead of slept."""

    def __init__(self):
        self.slept = []

    def sleep(self, seconds):
        self.slept.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def hub_calls(monkeypatch):
    """Records every hf_hub_download call (passing it through), so that a test sees a download was tried.

    Back-off sleeps of huggingface_hub are recorded, not slept: the code must not reach them (it checks that the
    hub is reachable first, and reads only the local cache when it is not)."""
    import huggingface_hub
    import huggingface_hub.utils._http
    import open_clip.pretrained
    sleeps = _NoBackoffSleep()
    monkeypatch.setattr(huggingface_hub.utils._http, 'time', sleeps)
    calls = []
    real = huggingface_hub.hf_hub_download

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', spy)
    monkeypatch.setattr(open_clip.pretrained, 'hf_hub_download', spy)
    yield calls
    assert not sleeps.slept, 'huggingface_hub retried a dead network with back-off'


def assert_both_ways_out(message: str):
    assert '--pretrained-file' in message and '--no-pretrained' in message, message


@pytest.mark.parametrize('family, arch, tag, repo', [
    # atto is published as .fcmae / .fcmae_ft_in1k only
    ('cnn', 'convnextv2_atto', 'fcmae_ft_in1k', 'timm/convnextv2_atto.fcmae_ft_in1k'),
    # the default recipes: convnextv2_tiny.fcmae_ft_in22k_in1k, ViT-L-14-quickgelu / openai
    ('cnn', None, None, 'timm/convnextv2_tiny.fcmae_ft_in22k_in1k'),
    ('vit', None, None, 'timm/vit_large_patch14_clip_224.openai'),
])
def test_pretrained_download_with_no_network_says_what_to_do(family, arch, tag, repo, empty_caches, hub_calls):
    recipe = RECIPES[family].override(arch=arch, pretrained_tag=tag)
    started = time.monotonic()
    with pytest.raises(pretrained.PretrainedUnavailable) as info, torch.device('meta'):  # meta: no 300M-weight init
        create_model(recipe, pretrained=True)
    assert time.monotonic() - started < 30
    assert hub_calls, 'no download was attempted'
    assert {kw.get('repo_id', args[0] if args else None) for args, kw in hub_calls} == {repo}
    assert all(not kw.get('cache_dir') or str(empty_caches) in str(kw['cache_dir']) for _, kw in hub_calls)
    assert_both_ways_out(str(info.value))
    assert recipe.arch in str(info.value)
    assert info.value.__cause__ is not None


def test_pretrained_file_helpers_name_the_published_weights(monkeypatch, tmp_path):
    """Online, the published files are the ones asked for (the download itself is replaced by a fake)."""
    import huggingface_hub
    import open_clip.pretrained
    asked = []

    def fake_download(repo_id, filename=None, **kwargs):
        asked.append((repo_id, filename))
        f = tmp_path / repo_id.replace('/', '--') / (filename or 'x')
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
        return str(f)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
    monkeypatch.setattr(open_clip.pretrained, 'hf_hub_download', fake_download)
    path = pretrained.cnn_pretrained_file('convnextv2_tiny')
    assert asked[-1] == ('timm/convnextv2_tiny.fcmae_ft_in22k_in1k', 'model.safetensors') and path.is_file()
    path = pretrained.clip_pretrained_file('ViT-L-14-quickgelu')
    assert asked[-1][0] == 'timm/vit_large_patch14_clip_224.openai' and path.is_file()
    assert asked[-1][1] in ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin')
    with pytest.raises(ValueError, match='publishes no weights'):
        pretrained.cnn_pretrained_file('convnextv2_tiny', 'no_such_tag')
    # the default tag (ImageNet-22k fine-tuned) does not exist for the smallest sizes: say which tags do
    with pytest.raises(ValueError, match=r"'convnextv2_atto.fcmae_ft_in22k_in1k'.*fcmae_ft_in1k"):
        pretrained.cnn_pretrained_file('convnextv2_atto')
    assert len(asked) == 2   # no download for a name that is not published
    with pytest.raises(ValueError, match='publishes no weights'):
        pretrained.clip_pretrained_file('ViT-L-14-quickgelu', 'no_such_tag')


@pytest.fixture
def tiny_photo_folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / 'photos'
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / c / f'{i}.jpg')
    return root


@pytest.mark.parametrize('argv', [['cnn', '--arch', 'convnextv2_atto', '--pretrained-tag', 'fcmae_ft_in1k'],
                                  ['cnn']])
def test_train_cli_offline_exits_with_one_sentence(argv, tiny_photo_folder, tmp_path, empty_caches, hub_calls):
    import train
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        train.main([*argv, '--data', str(tiny_photo_folder), '--runs', str(tmp_path / 'runs'), '--name', 'offline',
                    '--size', '32', '--bs', '4', '--valid-pct', '0.4'])   # 6 of 15 photos: >= 1 per class
    assert time.monotonic() - started < 30
    code = info.value.code
    assert isinstance(code, str) and code not in ('', '0'), code    # a message: Python exits with status 1
    assert code.startswith('error: Could not download the pretrained weights')
    assert_both_ways_out(code)
    assert hub_calls
    assert not (tmp_path / 'runs' / 'offline' / 'models').exists()  # nothing trained


# ============================================================================================ architectures
@pytest.mark.parametrize('size', list(CONVNEXTV2_SIZES))
def test_infer_cnn_arch_for_every_convnextv2_size(size):
    import timm
    name = f'convnextv2_{size}'
    with torch.device('meta'):
        state_dict = timm.create_model(name, pretrained=False, num_classes=5).state_dict()
    assert infer_cnn_arch(state_dict) == name
    assert delivery_of(state_dict) == 'cnn'


@pytest.mark.parametrize('model_name', ['ViT-B-16', 'ViT-B-32', 'ViT-L-14', 'ViT-L-14-336'])
def test_infer_clip_spec_for_the_published_towers(model_name):
    spec = clip_spec_from_open_clip(model_name)
    with torch.device('meta'):
        tower = build_clip_tower(spec)
    state_dict = {'visual.' + k: v for k, v in tower.state_dict().items()}
    got = infer_clip_spec(state_dict, quick_gelu=spec.quick_gelu, head_width=spec.head_width)
    for field in ('image_size', 'patch_size', 'width', 'layers', 'output_dim'):
        assert getattr(got, field) == getattr(spec, field), field
    assert got == spec
    assert delivery_of(state_dict) == 'vit'
    expected = {'ViT-B-16': (224, 16, 768, 12, 512), 'ViT-B-32': (224, 32, 768, 12, 512),
                'ViT-L-14': (224, 14, 1024, 24, 768), 'ViT-L-14-336': (336, 14, 1024, 24, 768)}[model_name]
    assert (got.image_size, got.patch_size, got.width, got.layers, got.output_dim) == expected


def test_infer_cnn_arch_refuses_what_is_no_convnextv2():
    import timm
    with torch.device('meta'):
        resnet = timm.create_model('resnet18', pretrained=False, num_classes=5).state_dict()
        tower = build_clip_tower(clip_spec_from_open_clip('ViT-B-32'))
    vit = {'visual.' + k: v for k, v in tower.state_dict().items()}
    for state_dict in (resnet, vit, {}):
        with pytest.raises(ArchitectureError):
            infer_cnn_arch(state_dict)
    # ConvNeXt-like tensors of no V2 size (stage 2 one block short)
    with torch.device('meta'):
        atto = timm.create_model('convnextv2_atto', pretrained=False, num_classes=5).state_dict()
    short = {k: v for k, v in atto.items() if not k.startswith('stages.2.blocks.5.')}
    with pytest.raises(ArchitectureError, match='match no ConvNeXt V2 size'):
        infer_cnn_arch(short)
    assert delivery_of(resnet) is None
    assert delivery_of({}) is None
    assert delivery_of({'stem.0.weight': torch.zeros(1)}) is None
    with pytest.raises(ArchitectureError):
        infer_clip_spec(resnet)


# ============================================================================================ no downloads
@pytest.fixture
def downloads_forbidden(monkeypatch):
    import huggingface_hub
    import huggingface_hub.file_download
    import open_clip.pretrained
    import timm.models._builder
    import timm.models._hub

    def forbidden(*args, **kwargs):
        raise AssertionError(f'a download was attempted: {args} {kwargs}')
    for module, name in ((huggingface_hub, 'hf_hub_download'), (huggingface_hub.file_download, 'hf_hub_download'),
                         (open_clip.pretrained, 'download_pretrained'), (open_clip.pretrained, 'hf_hub_download'),
                         (open_clip.pretrained, 'download_pretrained_from_url'),
                         (timm.models._hub, 'hf_hub_download'), (timm.models._hub, 'download_cached_file'),
                         (timm.models._builder, 'load_pretrained'), (timm.models._builder, 'load_state_dict_from_hf'),
                         (timm.models._builder, 'load_state_dict_from_url')):
        monkeypatch.setattr(module, name, forbidden)


def test_building_and_loading_never_downloads(downloads_forbidden, tiny_clip_name, tiny_cnn_file, tiny_vit_file,
                                              atto_source, clip_model, tmp_path):
    from flowers_fastai import submit
    assert isinstance(build_cnn('convnextv2_atto'), torch.nn.Module)
    spec = clip_spec_from_open_clip(tiny_clip_name)
    assert isinstance(build_clip_tower(spec), torch.nn.Module)
    assert isinstance(ClipClassifier(spec), torch.nn.Module)
    assert create_model(CNN_ATTO, pretrained=False) is not None
    assert create_model(vit_recipe(tiny_clip_name), pretrained=False) is not None
    create_model(CNN_ATTO, pretrained=write_cnn_file(atto_source, tmp_path / 'cnn', 'safetensors'))
    create_model(vit_recipe(tiny_clip_name), pretrained=write_clip_file(clip_model, tmp_path / 'vit', 'open_clip_bin')[0])
    assert submit.load_cnn_model(tiny_cnn_file).flowers_family == 'cnn'
    assert submit.load_vit_model(tiny_vit_file).flowers_family == 'vit'
    with torch.device('meta'):
        build_cnn('convnextv2_huge')
        build_clip_tower(clip_spec_from_open_clip('ViT-L-14-336'))


def test_pretrained_module_documents_its_unavailable_error():
    assert issubclass(pretrained.PretrainedUnavailable, RuntimeError)
    assert issubclass(architectures.ArchitectureError, ValueError)
    message = pretrained._offline_message('X', OSError('no route'))
    assert_both_ways_out(message)
    assert '\n' not in message


def test_train_cli_names_the_published_tags_when_the_default_does_not_exist(tiny_photo_folder, tmp_path):
    import train
    with pytest.raises(SystemExit) as info:
        train.main(['cnn', '--arch', 'convnextv2_atto', '--data', str(tiny_photo_folder),
                    '--runs', str(tmp_path / 'runs'), '--valid-pct', '0.4'])
    assert str(info.value.code).startswith("error: timm publishes no weights named 'convnextv2_atto.fcmae_ft_in22k_in1k'")
    assert 'fcmae_ft_in1k' in str(info.value.code)


# ============================================================================================ crafted files
PRETRAINED_CONTAINERS = ['torch_zip', 'plain_pickle', 'torchscript_archive']


@pytest.mark.parametrize('container', PRETRAINED_CONTAINERS)
def test_crafted_pretrained_file_is_refused_and_never_runs(container, tmp_path):
    from flowers_fastai.models import create_model
    from flowers_fastai.recipes import RECIPES
    marker = tmp_path / 'marker'
    path = tmp_path / 'convnextv2_atto.pt'
    if container == 'torch_zip':
        crafted_torch_file(path, marker, {'stem.0.weight': torch.ones(1)})
    elif container == 'plain_pickle':
        path.write_bytes(pickle.dumps({'evil': RunsCode(marker)}))
    else:   # looks like OpenAI's TorchScript CLIP files (a zip with constants.pkl), its data.pkl runs code
        with zipfile.ZipFile(path, 'w') as z:
            for name in ('data.pkl', 'constants.pkl'):
                z.writestr(f'archive/{name}', pickle.dumps(RunsCode(marker), protocol=2))
            z.writestr('archive/version', '3\n')
    with pytest.raises(ValueError) as err:
        create_model(RECIPES['cnn'].override(arch='convnextv2_atto'), pretrained=path)
    assert not marker.exists(), 'code in the pretrained file ran'
    assert str(path) in str(err.value) and '\n' not in str(err.value)


def test_torchscript_pretrained_file_is_read_without_torch_jit_load(tmp_path, monkeypatch):
    """torch.jit.load would run the archive's TorchScript code (its __setstate__ methods): the tensors are read
    from the archive instead, the same ones jit.load gives."""
    from flowers_fastai.pretrained import read_checkpoint
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(2), torch.nn.Linear(2, 5)).half()
    path = tmp_path / 'ViT-Test.pt'
    torch.jit.save(torch.jit.script(model), str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError('torch.jit.load runs code in the archive')
    monkeypatch.setattr(torch.jit, 'load', forbidden)
    state = read_checkpoint(path)
    assert sorted(state) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value)
