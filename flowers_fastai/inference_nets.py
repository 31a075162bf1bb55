"""The two delivered networks written for CPU inference: ConvNeXt V2 (timm's key layout) and the CLIP ViT image
tower + head (open_clip's key layout). Same state_dict keys and shapes, same outputs (tests compare them with timm
and open_clip, to 1e-5 absolute); `submit` builds these instead of the training networks.

Why hand-written (timm and open_clip build the same networks for training):
- cold start: `import timm` or `import open_clip` alone costs 1.5-3 s on the 2-core CPU, the CNN's whole budget
  (load + first prediction <= 2 s); this module needs torch only;
- speed: linear layers go through oneDNN (`torch.ops.mkldnn._linear_pointwise`, the kernel PyTorch's own
  inductor emits for CPU) with packed weights and the activation and residual sum fused in, which on the AMD CPU
  measured here beats the MKL sgemm behind `F.linear`; convolution weights are packed too
  (`_convolution_pointwise`); activations stay channels-last, so ConvNeXt's NCHW <-> NHWC permutes are free;
  GRN's bias is folded into the next matmul and its scale applied in place. docs/benchmarks.md has the numbers.
  Training keeps timm / open_clip: this is inference only (no_grad / inference_mode); with autograd on, the
  plain `F.linear` / `conv2d` path is taken.
- optional int8 for the ViT's matmuls (`quantize_int8`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .inference import Served

QUICK_GELU_ALPHA = 1.702   # OpenAI CLIP's activation: x * sigmoid(1.702 x)


def _onednn_ok(x: torch.Tensor) -> bool:
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and onednn_usable())


_ONEDNN_USABLE = None   # probed once, on first use


def onednn_usable() -> bool:
    """Whether the private oneDNN ops of the fast path exist in this torch and compute, on this CPU, what
    `F.linear` / `F.conv2d` compute. They are private (`torch.ops.mkldnn._*`, what inductor emits): a torch
    release may rename or change them, and oneDNN may refuse a CPU. Probed once on tiny inputs (well under a
    millisecond); where the probe fails, every layer takes the plain path, slower but with the same outputs,
    instead of crashing a grader's loop."""
    global _ONEDNN_USABLE
    if _ONEDNN_USABLE is None:
        _ONEDNN_USABLE = _probe_onednn()
    return _ONEDNN_USABLE


def _probe_onednn() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with normal_tensors():
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
            fused = torch.ops.mkldnn._linear_pointwise(x, packed, b, 'gelu', [], 'none')
            summed = torch.ops.mkldnn._linear_pointwise.binary(x, torch.ones(4, 6), packed, b, 'add')
            image = torch.randn(1, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
            kernel = torch.randn(4, 3, 3, 3, generator=g)
            packed_kernel = torch.ops.mkldnn._reorder_convolution_weight(kernel, [1, 1], [1, 1], [1, 1], 1,
                                                                         list(image.shape))
            conv = torch.ops.mkldnn._convolution_pointwise(image, packed_kernel, None, [1, 1], [1, 1], [1, 1], 1,
                                                           'none', [], '')
            return bool(torch.allclose(fused, F.gelu(F.linear(x, w, b)), atol=1e-4)
                        and torch.allclose(summed, F.linear(x, w, b) + 1, atol=1e-4)
                        and torch.allclose(conv, F.conv2d(image, kernel, padding=1), atol=1e-4))
    except Exception as err:   # a missing op (AttributeError, RuntimeError), a refused CPU: any failure
        warnings.warn(f'oneDNN fast path unavailable on this torch / CPU ({type(err).__name__}: {err}); '
                      'using the plain PyTorch path (same outputs, slower)')
        return False


@contextlib.contextmanager
def normal_tensors():
    """Tensors made inside are normal tensors without autograd history, whatever mode the caller is in.

    Under `torch.inference_mode()` every new tensor is an inference tensor: it has no version counter (reading
    `_version` raises "Inference tensors do not track version counter"), and a parameter made of one, or given
    one later through `.data`, keeps that state for the model's life. So a model loaded, or a cache packed, inside
    a caller's `inference_mode` would differ from one made outside it. `submit`'s loaders and every packed cache
    here build their tensors inside this instead: the same model whatever the caller's mode (inference_mode,
    no_grad, enable_grad)."""
    with torch.inference_mode(False), torch.no_grad():   # inference_mode(False) turns grad on: no_grad after it
        yield


def _state_of(t: torch.Tensor) -> tuple:
    """What identifies a parameter's current contents: its memory, its version counter (moved by any in-place
    change) and its shape. A tensor made under inference_mode has no version counter: None (such a tensor can
    still change in place inside inference_mode; `submit`'s loaders never make one, see `normal_tensors`)."""
    try:
        version = t._version
    except RuntimeError:
        version = None
    return t.data_ptr(), version, tuple(t.shape)


class _Cache:
    """What the packed caches below share: a lock for repacking, and an empty cache in a copy. A pickled copy (a
    `spawn` / `forkserver` process pool sends the model to its workers) holds no packed tensor (oneDNN's opaque
    ones cannot be pickled) and repacks on its first call; a forked child gets fresh locks (`_after_fork_in_child`),
    since a lock another thread of the parent held at the fork would stay held in the child for ever."""

    def _reset(self):
        self._cached, self._lock = self._empty(), threading.Lock()
        _CACHES.add(self)

    def _empty(self):
        return None, None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ('_cached', '_lock')}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()


_CACHES = weakref.WeakSet()   # every live cache, for `_after_fork_in_child`


def _after_fork_in_child():
    """In a forked child: one intra-op thread, and fresh cache locks. PyTorch's OpenMP thread pool does not survive
    fork (its worker threads are not copied; a child's parallel op waits for them for ever: a `multiprocessing`
    pool of the default fork start method hung on its first prediction), and the caches' locks could be copied
    held. One thread per worker is also what a process pool wants: its workers already share the cores."""
    torch.set_num_threads(1)
    for cache in list(_CACHES):
        cache._lock = threading.Lock()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PackedWeight(_Cache):
    """A weight reordered once into oneDNN's blocked layout (what inductor's freezing does for CPU linears),
    kept beside the parameter, which stays the model's state. Repacked if the parameter is replaced or
    changed in place (its version counter moves), so a packed copy is never stale. Safe to share between threads:
    the (state, packed copy) pair is replaced as one object, and repacking is done under a lock."""

    def __init__(self, weight: torch.Tensor, rows_hint: int, scale: float = 1.0):
        self.rows_hint, self.scale = rows_hint, scale   # scale: the packed copy is of scale * weight
        self._reset()
        self.get(weight)

    @property
    def packed(self) -> torch.Tensor | None:
        return self._cached[1]

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of `weight` (the parameter, or a view of it), packed again if the parameter moved."""
        key = _state_of(weight)
        cached = self._cached          # one read: another thread may replace the pair meanwhile
        if cached[0] == key:
            return cached[1]
        with self._lock, normal_tensors():
            if self._cached[0] != key:
                w = weight.detach().flatten(1)
                self._cached = key, torch.ops.mkldnn._reorder_linear_weight(w * self.scale if self.scale != 1 else w,
                                                                           self.rows_hint)
            return self._cached[1]


class PackedConv(_Cache):
    """A convolution weight reordered once into oneDNN's layout for one input shape (what inductor's freezing does
    for CPU convolutions; oneDNN chooses the layout from the shape), kept beside the parameter like
    `PackedWeight`: repacked when the parameter moves, a few input shapes remembered; thread-safe the same way
    (the remembered shapes are a new dict each time one is added, never a dict changed while another thread reads
    it)."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self._reset()

    def _empty(self):
        return None, {}

    def get(self, input_shape: torch.Size) -> torch.Tensor:
        w = self.conv.weight
        key = _state_of(w)
        cached_key, by_shape = self._cached
        if cached_key == key and (packed := by_shape.get(input_shape)) is not None:
            return packed
        with self._lock, normal_tensors():
            cached_key, by_shape = self._cached
            by_shape = dict(by_shape) if cached_key == key and len(by_shape) < 8 else {}
            if input_shape not in by_shape:
                c = self.conv
                by_shape[input_shape] = torch.ops.mkldnn._reorder_convolution_weight(
                    w.detach(), list(c.padding), list(c.stride), list(c.dilation), c.groups, list(input_shape))
            self._cached = key, by_shape
            return by_shape[input_shape]


def conv2d(x: torch.Tensor, conv: nn.Conv2d, packed: PackedConv | None) -> torch.Tensor:
    """conv(x); through oneDNN with the packed weight for channels-last inputs at inference: skips the weight
    reorder oneDNN otherwise makes on every call (most of a depthwise 7x7 convolution's time at these sizes)."""
    if packed is not None and _onednn_ok(x) and x.is_contiguous(memory_format=torch.channels_last):
        return torch.ops.mkldnn._convolution_pointwise(x, packed.get(x.shape), conv.bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       'none', [], '')
    return conv(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
           packed: PackedWeight | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias) (+ residual) over the last dimension, `act` None, 'gelu' (exact, erf) or
    'swish' (x * sigmoid(x)). oneDNN applies the activation or the residual sum inside the matmul, from a
    packed copy of the weight when given; elsewhere (autograd, GPU, other dtypes) it is plain `F.linear`."""
    out_features = weight.shape[0]
    if isinstance(packed, Int8Linear) and not torch.is_grad_enabled() and x.device.type == 'cpu':
        return packed(x, act, residual)
    if residual is not None:
        if _onednn_ok(x) and act is None and residual.is_contiguous():
            w = packed.get(weight) if packed is not None else weight.flatten(1)
            y = torch.ops.mkldnn._linear_pointwise.binary(x.reshape(-1, x.shape[-1]), residual.view(-1, out_features),
                                                         w, bias, 'add')
            return y.view(*x.shape[:-1], out_features)
        return residual + linear(x, weight, bias, act, packed)
    if _onednn_ok(x):
        attr, algorithm = {None: ('none', ''), 'gelu': ('gelu', 'none'), 'swish': ('swish', '')}[act]
        w = packed.get(weight) if packed is not None else weight.flatten(1)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, attr, [], algorithm)
        return y.view(*x.shape[:-1], out_features)
    y = F.linear(x, weight.flatten(1), bias)
    return y if act is None else F.gelu(y) if act == 'gelu' else F.silu(y)


def keep_freed_memory() -> bool:
    """Opt-in: ask glibc to keep freed memory in the process rather than hand it back to the OS at once.

    Every forward pass allocates and frees the same few-MB activations. glibc may serve blocks that big with mmap,
    or trim them off the heap when freed, so that each pass page-faults them in again (benchmarks/latency.py
    counts thousands of page faults per ConvNeXt V2 tiny prediction, none with this; docs/speed.md has the
    numbers and where the effect did not show). Raising glibc's mmap threshold (to its 32 MiB maximum) and trim
    threshold keeps them mapped; this is what PyTorch's CPU performance guides get from jemalloc/tcmalloc. The
    cost: the process keeps its peak heap (tens of MB for the CNN, a few hundred for ViT-L/14).

    Not called by any loader: it changes malloc for the whole process, which is the host application's call,
    not a library's. A serving process calls it once, or sets glibc's own equivalent before it starts:
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 (docs/speed.md). Linux/glibc only, applied
    once; FLOWERS_KEEP_MALLOC=1 in the environment vetoes it (for a process whose memory is being measured).
    Returns whether it applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = False
        if sys.platform.startswith('linux') and os.environ.get('FLOWERS_KEEP_MALLOC') != '1':
            try:
                libc = ctypes.CDLL('libc.so.6')
                m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's mallopt parameter numbers
                _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
                                     and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD))
            except (OSError, AttributeError):   # no glibc (musl, ...): nothing to tune
                pass
    return _MALLOC_TUNED


# The values keep_freed_memory gives glibc; docs/speed.md quotes them as MALLOC_*_ environment settings.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30
_MALLOC_TUNED = None


class Int8Linear(_Cache):
    """A linear layer in int8 for CPU inference: its weight quantized once (symmetric, per output channel), its
    input quantized on each call from its own range, the products summed in int32 (fbgemm), as
    `torch.ao.quantization.quantize_dynamic` does to an `nn.Linear`; written out here because the attention's
    `in_proj_weight` is not an `nn.Linear` and QuickGELU's constants are folded into the weights (`weight_scale`,
    `bias_scale`). It reads its parameters from `module` by name, so it carries its bias (`linear` ignores the one
    it is given) and, like `PackedWeight`, is a cache beside the parameters, quantized again when they change or
    are replaced (`load_state_dict(assign=True)`)."""

    def __init__(self, module: nn.Module, weight: str, bias: str, weight_scale: float = 1.0, bias_scale: float = 1.0):
        self.module, self.names, self.weight_scale, self.bias_scale = module, (weight, bias), weight_scale, bias_scale
        self._reset()   # thread-safe as `PackedWeight`

    def _pack(self):
        weight, bias = (getattr(self.module, name) for name in self.names)
        key = (_state_of(weight), _state_of(bias))
        cached = self._cached
        if cached[0] == key:
            return cached[1]
        with self._lock, normal_tensors():
            if self._cached[0] != key:
                w = weight.detach().float() * self.weight_scale
                scales = (w.abs().amax(dim=1) / 127.5).clamp_min(torch.finfo(torch.float32).eps).double()
                # torch marks its quantized tensors deprecated (the ops remain in 2.x). Through the dispatcher op
                # that note is not a Python warning: no warning filter is touched to hide it (filters are
                # process-wide, and changing them here lost other threads' warnings)
                q = torch.ops.aten.quantize_per_channel(w, scales, torch.zeros(len(w), dtype=torch.long), 0,
                                                        torch.qint8)
                self._cached = key, torch.ops.quantized.linear_prepack(q, bias.detach().float() * self.bias_scale)
            return self._cached[1]

    def __call__(self, x: torch.Tensor, act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        # reduce_range: 7-bit activations, as quantize_dynamic's x86 default (no int16 overflow in the kernel)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), self._pack(), True)
        y = y.view(*x.shape[:-1], -1)
        if act is not None:
            y = F.gelu(y) if act == 'gelu' else F.silu(y, inplace=True)
        return y if residual is None else y.add_(residual)


def quantize_int8(model: nn.Module) -> nn.Module:
    """The CLIP ViT's transformer matmuls in int8 (`Int8Linear`), in place; the patch embedding, attention
    products, layer norms and the head stay fp32. `model`: a `ClipViTClassifier`, or a module holding some (an
    ensemble: its ViT is quantized, its CNN left as is). Returns the model: the same module, same state_dict
    (fp32), its outputs close to the fp32 ones but not equal: measure the accuracy change on held-out photos
    (`python -m flowers_fastai.evaluate ... --int8`) before relying on it. CPU, inference only."""
    vits = [m for m in model.modules() if isinstance(m, ClipViTClassifier)]
    if not vits:
        raise TypeError(f'int8 is offered for the CLIP ViT only, and this {type(model).__name__} holds none')
    if not {'fbgemm', 'x86'} & set(torch.backends.quantized.supported_engines):
        raise RuntimeError('this torch build has no x86 quantized CPU kernels (fbgemm): int8 is unavailable')
    for block in (block for vit in vits for block in vit.visual.transformer.resblocks):
        attn, mlp = block.attn, block.mlp
        attn.packed = (Int8Linear(attn, 'in_proj_weight', 'in_proj_bias'),
                       Int8Linear(attn.out_proj, 'weight', 'bias'))
        a = QUICK_GELU_ALPHA if mlp.quick_gelu else 1.0   # as in _ClipMlp.pack: swish on a * c_fc, then c_proj / a
        mlp.packed = (Int8Linear(mlp.c_fc, 'weight', 'bias', a, a), Int8Linear(mlp.c_proj, 'weight', 'bias', 1 / a))
    return model


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Pack every linear and convolution weight of an inference network for oneDNN (linear ones at load time,
    convolution ones at the first input of each shape) and put its convolution weights in channels-last order.
    The outputs do not change; the state_dict neither. (After `quantize_int8`, this puts the ViT back to fp32.)
    malloc is left as it is: `keep_freed_memory` is the caller's opt-in."""
    if isinstance(model, ConvNeXtV2):
        # `.to` swaps each parameter's `.data`: the new tensor must be of the parameter's own kind (an inference
        # tensor given a normal one, or the reverse, is left half one, half the other); `submit` builds normal ones
        inference = any(p.is_inference() for p in model.parameters())
        with torch.inference_mode() if inference else normal_tensors():
            model = model.to(memory_format=torch.channels_last)
    if onednn_usable():   # else nothing is packed: every layer takes the plain path
        for module in model.modules():
            if hasattr(module, 'pack'):
                module.pack()
    return model


# ---------------------------------------------------------------------------------------------- ConvNeXt V2
class _Norm(nn.Module):
    """LayerNorm over channels, on channels-last activations; keys `weight`, `bias` (timm LayerNorm/2d)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_nhwc, self.weight.shape, self.weight, self.bias, self.eps)


class _Fc(nn.Module):
    """A 1x1 projection with timm's key and shape: `Linear` (C_out x C_in), or `Conv2d` (C_out x C_in x 1 x 1) in
    the small sizes (atto ... nano) where timm builds the MLP from 1x1 convolutions."""

    def __init__(self, c_in: int, c_out: int, conv: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, *((1, 1) if conv else ())))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.packed = None

    def pack(self, rows_hint: int = 196):
        self.packed = PackedWeight(self.weight, rows_hint)

    def forward(self, x_nhwc: torch.Tensor, act: str | None = None) -> torch.Tensor:
        return linear(x_nhwc, self.weight, self.bias, act, self.packed)


class _GRN(nn.Module):
    """ConvNeXt V2's global response norm, x + bias + weight * (x * N(x)), computed as one fused
    bias + x * (1 + weight * N(x)) pass; N(x) = ||x||_spatial / mean over channels (+ eps)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim)), eps

    def scale(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        """weight * N(x), per image and channel: GRN is x + bias + x * scale(x). The spatial L2 norm as
        sqrt(sum of squares) (on channels-last activations 5-7x faster than `vector_norm` over the two spatial
        dims); the channel mean as a sum, N = C g / (sum g + C eps). Few ops: these run right after a big matmul,
        where each small op costs 10-20 us on this CPU (timed inside the network) instead of 1-2 us in a loop."""
        g = (x_nhwc * x_nhwc).sum(dim=(1, 2), keepdim=True).sqrt_()
        c = g.shape[-1]
        return (g * self.weight).div_(g.sum(dim=-1, keepdim=True).add_(c * self.eps)).mul_(c)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x_nhwc + self.bias, x_nhwc, self.scale(x_nhwc))


class _Mlp(nn.Module):
    def __init__(self, dim: int, conv: bool):
        super().__init__()
        self.fc1, self.grn, self.fc2 = _Fc(dim, 4 * dim, conv), _GRN(4 * dim), _Fc(4 * dim, dim, conv)

        self._folded = (None, None)

    def _folded_bias(self) -> torch.Tensor:
        """fc2's bias with GRN's folded in: fc2(h s + b) = fc2(h s) + W2 b. Cached, recomputed if a weight moves
        (the pair replaced as one object: threads sharing the model see an old pair or a new one, never a mix)."""
        key = tuple(_state_of(t) for t in (self.fc2.weight, self.fc2.bias, self.grn.bias))
        folded = self._folded
        if key != folded[0]:
            with normal_tensors():
                folded = self._folded = key, self.fc2.bias + self.fc2.weight.flatten(1) @ self.grn.bias
        return folded[1]

    def forward(self, x_nhwc: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """fc2(GRN(GELU(fc1(x)))) (+ residual, summed inside fc2 at inference)."""
        h = self.fc1(x_nhwc, act='gelu')
        if torch.is_grad_enabled():
            y = self.fc2(self.grn(h))
            return y if residual is None else residual + y
        # inference: h scaled in place (h + h s), GRN's bias inside fc2's: one pass over the wide activations fewer
        return linear(h.addcmul_(h, self.grn.scale(h)), self.fc2.weight, self._folded_bias(),
                      packed=self.fc2.packed, residual=residual)


class _Block(nn.Module):
    def __init__(self, dim: int, conv: bool):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.mlp = _Norm(dim), _Mlp(dim, conv)
        self.packed = None

    def pack(self):
        self.packed = PackedConv(self.conv_dw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: NCHW in channels-last memory
        y = conv2d(x, self.conv_dw, self.packed).permute(0, 2, 3, 1)   # a free view: NHWC contiguous
        return self.mlp(self.norm(y), residual=x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Downsample(nn.Sequential):
    """LayerNorm, then a 2x2 stride-2 convolution (its weight packed for oneDNN at inference)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(_Norm(c_in), nn.Conv2d(c_in, c_out, 2, stride=2))
        self.packed = None

    def pack(self):
        self.packed = PackedConv(self[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)   # normed over channels; NCHW in channels-last memory
        return conv2d(y, self[1], self.packed)


class _Stage(nn.Module):
    def __init__(self, c_in: int, dim: int, depth: int, conv: bool, first: bool):
        super().__init__()
        if not first:
            self.downsample = _Downsample(c_in, dim)
        self.blocks = nn.Sequential(*[_Block(dim, conv) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x) if hasattr(self, 'downsample') else x)


class _Stem(nn.Sequential):
    def __init__(self, dim: int):
        super().__init__(nn.Conv2d(3, dim, 4, stride=4), _Norm(dim))
        self.packed = None

    def pack(self):
        self.packed = PackedConv(self[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](conv2d(x, self[0], self.packed).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Head(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm, self.fc = _Norm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class ConvNeXtV2(Served):
    """ConvNeXt V2 for inference, with timm's `convnextv2_*` state_dict (keys and shapes). The small sizes
    (dims[0] < 96: atto ... nano) keep timm's 1x1-conv MLP weight shapes."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int = 5):
        super().__init__()
        conv = dims[0] < 96   # timm: conv_mlp=True for atto, femto, pico, nano
        self.stem = _Stem(dims[0])
        self.stages = nn.Sequential(*[_Stage(dims[max(i - 1, 0)], dims[i], depths[i], conv, i == 0)
                                      for i in range(len(depths))])
        self.head = _Head(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.stages(self.stem(x)))


# ---------------------------------------------------------------------------------------------- CLIP ViT
class _Attention(nn.Module):
    """nn.MultiheadAttention's parameters (`in_proj_weight`, `in_proj_bias`, `out_proj`), self-attention only,
    through `scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.packed = (None, None)

    def pack(self, rows_hint: int = 257):
        self.packed = PackedWeight(self.in_proj_weight, rows_hint), PackedWeight(self.out_proj.weight, rows_hint)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        n, length, width = x.shape
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias, packed=self.packed[0])
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, width)
        return linear(out, self.out_proj.weight, self.out_proj.bias, packed=self.packed[1], residual=residual)


class _ClipMlp(nn.Module):
    """c_fc -> GELU (OpenCLIP) or QuickGELU (OpenAI) -> c_proj. QuickGELU(y) = swish(a y) / a with a = 1.702:
    with packed weights it runs as swish fused into a matmul with a * W_fc (and a * b_fc), then a matmul with
    W_proj / a: exact algebra, and the wide hidden activations are written once and read once."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.c_fc, self.c_proj, self.quick_gelu = nn.Linear(width, hidden), nn.Linear(hidden, width), quick_gelu
        self.packed = (None, None)

    def pack(self, rows_hint: int = 257):
        a = QUICK_GELU_ALPHA if self.quick_gelu else 1.0
        self.packed = (PackedWeight(self.c_fc.weight, rows_hint, scale=a),
                       PackedWeight(self.c_proj.weight, rows_hint, scale=1 / a))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        fc, proj = self.packed
        if not self.quick_gelu:
            h = linear(x, self.c_fc.weight, self.c_fc.bias, 'gelu', fc)
            return linear(h, self.c_proj.weight, self.c_proj.bias, packed=proj, residual=residual)
        a = QUICK_GELU_ALPHA
        if fc is not None and _onednn_ok(x):   # the scales live in the packed weights
            h = linear(x, self.c_fc.weight, self.c_fc.bias * a, 'swish', fc)         # = a * QuickGELU(c_fc(x))
            return linear(h, self.c_proj.weight, self.c_proj.bias, packed=proj, residual=residual)
        h = linear(x, self.c_fc.weight, self.c_fc.bias)
        y = self.c_proj(h * torch.sigmoid(a * h))
        return y if residual is None else residual + y


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), _Attention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), _ClipMlp(width, 4 * width, quick_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # both residual sums happen inside the matmuls
        x = self.attn(self.ln_1(x), residual=x)
        return self.mlp(self.ln_2(x), residual=x)


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualBlock(width, heads, quick_gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class ClipVisionTower(nn.Module):
    """open_clip's CLIP `VisionTransformer` (class-token pooling, ln_pre, ln_post, proj) for inference, with its
    state_dict."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, output_dim: int,
                 head_width: int = 64, quick_gelu: bool = True):
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // head_width, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)                       # N x grid^2 x width
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj                           # class token


class ClipViTClassifier(Served):
    """CLIP image tower + Linear(output_dim, 5): the ViT weight file's layout (`visual.*`, `head.*`)."""

    def __init__(self, spec, num_classes: int = 5):
        super().__init__()
        self.spec = spec
        self.visual = ClipVisionTower(spec.image_size, spec.patch_size, spec.width, spec.layers, spec.output_dim,
                                      spec.head_width, spec.quick_gelu)
        self.head = nn.Linear(spec.output_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))
