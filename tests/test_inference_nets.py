"""The delivery networks (inference_nets.py) are timm's ConvNeXt V2 and open_clip's CLIP tower: same keys, same
shapes, same outputs, on the fast oneDNN path (inference) and on the plain one (autograd)."""
from __future__ import annotations

import sys

import pytest
import torch

from flowers_fastai.architectures import CONVNEXTV2_SIZES, ClipClassifier, ClipTowerSpec, build_cnn
from flowers_fastai.inference_nets import ClipViTClassifier, ConvNeXtV2, pack_for_cpu


def _randomize(model):
    """Weights far from the initialisation (GRN and layer-scale style parameters start at 0 in timm)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.normal_(0, 0.2 if value.ndim == 1 else 0.05)
    return model


def _same_outputs(reference, fast, x):
    state = reference.state_dict()
    assert [(k, v.shape) for k, v in fast.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    fast.load_state_dict(state, strict=True)
    with torch.inference_mode():      # oneDNN path, then with packed weights (what submit serves)
        expected = reference(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-4)
        packed = pack_for_cpu(fast)
        torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-4)
        assert sorted(packed.state_dict()) == sorted(state)   # packing is a cache, not state
    with torch.enable_grad():         # autograd: plain F.linear path, gradients flow
        out = fast(x.requires_grad_())
        torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-4)
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('size', ['atto', 'tiny'])   # atto: timm's 1x1-conv MLP weights; tiny: Linear weights
def test_convnextv2_matches_timm(size):
    reference = _randomize(build_cnn(f'convnextv2_{size}')).eval()
    _same_outputs(reference, ConvNeXtV2(*CONVNEXTV2_SIZES[size]).eval(), torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize('quick_gelu', [True, False], ids=['openai-quickgelu', 'openclip-gelu'])
def test_clip_tower_matches_open_clip(quick_gelu):
    spec = ClipTowerSpec(image_size=32, patch_size=8, width=64, layers=2, output_dim=32, head_width=32,
                         quick_gelu=quick_gelu)
    reference = _randomize(ClipClassifier(spec)).eval()
    _same_outputs(reference, ClipViTClassifier(spec).eval(), torch.randn(2, 3, 32, 32))


def test_packed_weights_follow_a_change_of_the_parameters():
    reference = _randomize(build_cnn('convnextv2_atto')).eval()
    fast = ConvNeXtV2(*CONVNEXTV2_SIZES['atto']).eval()
    fast.load_state_dict(reference.state_dict())
    fast = pack_for_cpu(fast)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = fast(x)
    # in place, and by loading another state_dict: both must reach the packed copies (linear and conv weights)
    for name in ('stages.3.blocks.1.mlp.fc2.weight', 'stages.3.blocks.0.conv_dw.weight', 'stages.2.downsample.1.weight',
                 'stem.0.weight'):
        delta = torch.randn_like(fast.get_parameter(name))
        with torch.no_grad():
            fast.get_parameter(name).add_(delta)
            reference.get_parameter(name).add_(delta)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-4)
            assert not torch.allclose(fast(x), before, atol=1e-4), name
            before = fast(x)
    fast.load_state_dict(_randomize(build_cnn('convnextv2_atto')).state_dict())
    with torch.inference_mode():
        assert not torch.allclose(fast(x), reference(x), atol=1e-4)


def test_loaded_model_predicts_without_page_faulting_its_activations_in_again(tiny_cnn_file):
    """keep_freed_memory: a few-MB activation freed after one prediction is reused by the next one instead of
    being unmapped and faulted in again (thousands of page faults per prediction otherwise, on glibc)."""
    import resource

    from flowers_fastai.inference_nets import keep_freed_memory
    from flowers_fastai.submit import load_cnn_model
    if not sys.platform.startswith('linux') or not keep_freed_memory():
        pytest.skip('glibc malloc tuning applies on Linux/glibc only')
    model = load_cnn_model(tiny_cnn_file)
    x = torch.randn(1, 3, 448, 448)       # stage-0 activations of ~2.5 MB: over glibc's default mmap threshold
    with torch.inference_mode():
        model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            model(x)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    assert faults < 50, f'{faults:.0f} page faults per forward'


def test_loading_leaves_malloc_alone_unless_the_caller_opts_in(tiny_cnn_file, tiny_vit_file, monkeypatch):
    """No process-wide mallopt at load (it would change how the caller's whole process allocates): loading and
    packing never reach glibc's mallopt; the explicit `keep_freed_memory()` does, with the documented values (so
    this spy would see a loader that called it)."""
    import ctypes

    from flowers_fastai import inference_nets
    from flowers_fastai.submit import load_cnn_model, load_vit_model
    calls, real_cdll = [], ctypes.CDLL

    class SpyLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, 'CDLL', lambda name, *a, **k: SpyLibc() if 'libc' in str(name)
                        else real_cdll(name, *a, **k))
    monkeypatch.setattr(inference_nets, '_MALLOC_TUNED', None)   # as in a fresh process
    monkeypatch.delenv('FLOWERS_KEEP_MALLOC', raising=False)
    load_cnn_model(tiny_cnn_file)
    load_vit_model(tiny_vit_file)
    pack_for_cpu(ConvNeXtV2(*CONVNEXTV2_SIZES['atto']).eval())
    assert calls == [] and inference_nets._MALLOC_TUNED is None
    if sys.platform.startswith('linux'):
        assert inference_nets.keep_freed_memory() is True
        assert calls == [(-3, 32 * 2**20), (-1, 2**30)]   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        inference_nets.keep_freed_memory()
        assert len(calls) == 2                             # once per process


@pytest.mark.parametrize('quick_gelu', [True, False], ids=['openai-quickgelu', 'openclip-gelu'])
def test_int8_vit_stays_close_to_fp32_and_follows_its_parameters(quick_gelu):
    """quantize_int8: the transformer matmuls really run in int8 (outputs move, a little), the state_dict stays
    the fp32 one, and the int8 copies follow a change of the parameters."""
    from flowers_fastai.inference_nets import Int8Linear, quantize_int8
    spec = ClipTowerSpec(image_size=32, patch_size=8, width=64, layers=2, output_dim=32, head_width=32,
                         quick_gelu=quick_gelu)
    reference = _randomize(ClipClassifier(spec)).eval()
    model = pack_for_cpu(ClipViTClassifier(spec).eval())
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        fp32 = reference(x)
        assert quantize_int8(model) is model
        int8 = model(x)
    assert all(isinstance(p, Int8Linear) for block in model.visual.transformer.resblocks
               for p in block.attn.packed + block.mlp.packed)
    assert not torch.allclose(int8, fp32, atol=1e-6)                          # not the fp32 path
    assert (int8 - fp32).abs().max() < 0.02 * fp32.abs().max()                 # int8 error: about 1 %
    assert torch.equal(int8.softmax(1).argmax(1), fp32.softmax(1).argmax(1))
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    name = 'visual.transformer.resblocks.1.mlp.c_proj.weight'
    delta = torch.randn_like(model.get_parameter(name))
    with torch.no_grad():
        model.get_parameter(name).add_(delta)
        reference.get_parameter(name).add_(delta)
    with torch.inference_mode():
        moved, expected = model(x), reference(x)
    assert not torch.allclose(moved, int8, atol=1e-3)
    assert (moved - expected).abs().max() < 0.02 * expected.abs().max()
    other = _randomize(ClipClassifier(spec)).eval()                           # parameters replaced, not changed
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict(), assign=True)
    with torch.inference_mode():
        replaced, expected = model(x), other(x)
    assert (replaced - expected).abs().max() < 0.02 * expected.abs().max()
    assert not torch.allclose(replaced, moved, atol=1e-3)
    with torch.enable_grad():                                                  # autograd: the fp32 path
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)


def test_int8_is_refused_for_the_cnn():
    from flowers_fastai.inference_nets import quantize_int8
    with pytest.raises(TypeError, match='CLIP ViT only'):
        quantize_int8(ConvNeXtV2(*CONVNEXTV2_SIZES['atto']))


def test_a_missing_or_broken_onednn_op_falls_back_to_the_plain_path(tiny_cnn_file, tiny_vit_file, monkeypatch):
    """The fast path uses private oneDNN ops; where a torch or a CPU lacks one, or it computes something else,
    the probe at load turns the fast path off and the models give the same outputs through the plain path."""
    import warnings
    from flowers_fastai import inference_nets
    from flowers_fastai.preprocess import load_for_model
    from flowers_fastai.submit import load_cnn_model, load_vit_model
    from .helpers import EXAMPLES
    photo = next(iter(sorted(EXAMPLES.glob('*.jpg'))))
    expected = {}
    for name, load, path in (('cnn', load_cnn_model, tiny_cnn_file), ('vit', load_vit_model, tiny_vit_file)):
        model = load(path)
        with torch.no_grad():
            expected[name] = model(load_for_model(photo, model.flowers_preprocessing))

    def missing(*args, **kwargs):
        raise RuntimeError('No such operator mkldnn::_linear_pointwise')

    def wrong(x, w, b, *args):   # an op that runs but computes something else is refused too
        return torch.zeros(x.shape[0], w.shape[0])
    for broken in (missing, wrong):
        monkeypatch.setattr(inference_nets, '_ONEDNN_USABLE', None)
        monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', broken)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            models = {'cnn': load_cnn_model(tiny_cnn_file), 'vit': load_vit_model(tiny_vit_file)}
        assert inference_nets.onednn_usable() is False
        for name, model in models.items():
            packed = [getattr(m, 'packed', None) for m in model.modules()]
            caches = [c for p in packed for c in (p if isinstance(p, tuple) else (p,))]   # attention packs two
            assert not any(isinstance(c, (inference_nets.PackedWeight, inference_nets.PackedConv)) for c in caches)
            with torch.no_grad():
                got = model(load_for_model(photo, model.flowers_preprocessing))
            torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0)
        monkeypatch.undo()
    assert inference_nets.onednn_usable()   # the real ops are back, and so is the fast path


def test_requirements_and_pyproject_give_the_torch_range_the_onednn_ops_were_run_with():
    """The fast path's private ops were run with the torch of requirements.txt's range; pyproject.toml must say
    the same, and the torch running these tests must lie in it (else they vouch for nothing)."""
    import tomllib

    from packaging.requirements import Requirement

    from .helpers import REPO
    listed = [Requirement(line) for line in (REPO / 'requirements.txt').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    declared = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['dependencies']
    torch_req = [r for r in listed if r.name == 'torch']
    assert [str(r.specifier) for r in torch_req] == [str(Requirement(d).specifier) for d in declared
                                                      if Requirement(d).name == 'torch']
    assert torch_req[0].specifier.contains(torch.__version__.split('+')[0])


def test_int8_packing_leaves_the_process_warning_filters_alone(tiny_vit_file, monkeypatch):
    """Warning filters are process-wide: hiding torch's deprecation note with `warnings.catch_warnings` while
    repacking made another thread lose its own warnings (166 of 400 truncation warnings). Quantizing and
    predicting must not touch them."""
    import warnings

    from flowers_fastai.submit import load_vit_model, predict_proba, quantize_int8
    from .helpers import EXAMPLES

    def forbidden(*args, **kwargs):
        raise AssertionError('the process-wide warning filters were changed')
    model = quantize_int8(load_vit_model(tiny_vit_file))
    for name in ('catch_warnings', 'simplefilter', 'filterwarnings', 'resetwarnings'):
        monkeypatch.setattr(warnings, name, forbidden)
    filters = list(warnings.filters)
    with torch.no_grad():   # repack: the parameters moved, so every Int8Linear quantizes again
        for p in model.parameters():
            p.mul_(1.0)
    p = predict_proba(model, sorted(EXAMPLES.glob('*.jpg'))[0])
    assert abs(sum(p.values()) - 1) < 1e-5
    assert warnings.filters == filters
