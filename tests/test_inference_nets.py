"""The delivery networks (inference_nets.py) are timm's ConvNeXt V2 and open_clip's CLIP tower: same keys, same
shapes, same outputs, on the fast oneDNN path (inference) and on the plain one (autograd)."""
from __future__ import annotations

import pytest
import torch

from flowers_fastai.architectures import CONVNEXTV2_SIZES, ClipClassifier, ClipTowerSpec, build_cnn
from flowers_fastai.inference_nets import ClipViTClassifier, ConvNeXtV2


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
    with torch.inference_mode():      # oneDNN path
        expected = reference(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-4)
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
