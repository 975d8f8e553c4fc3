"""Hand-written CPU kernels for the memory-bound and op-bound parts of a CPU training step, compiled on first use.

C kernels in ``fastclr/csrc/cpu_kernels.c``; each has a PyTorch reference it is tested against
(``tests/test_kernels.py``):

* :func:`pool_relu` (autograd): 2x2 max-pool then ReLU (both encoders). The same function and gradient as
  ``F.relu(F.max_pool2d(x, 2))``, ties included (the first maximum in raster order).
* :func:`conv3x3_pool_relu` (autograd): the tutorial network's first block, a 3x3 conv with one input channel
  on the normalised image, then the pool and the ReLU, without writing the full-resolution conv output.
* :func:`bn_act` (autograd): the cnn's training-mode ``BatchNorm2d`` with the max-pool + ReLU, the ReLU +
  average pool, or the ReLU after it, two passes each way (``F.batch_norm`` and the layers' gradients, to float
  rounding).
* :func:`stem` (autograd): the cnn's first stage whole under bf16 autocast, the 3x3 conv of a few input channels,
  training-mode BatchNorm, the max-pool and the ReLU, on AVX512-BF16 dot products, the BN statistics summed as the
  conv writes its output and the conv's output gradient never written.
* :func:`conv3x3` (autograd): a 3x3 conv whose weight gradient is fastclr's, register-tiled sums over the pixels:
  bf16 on AVX512-BF16 dot products, f32 on the native vector; in f32 on AVX2, all three passes by Winograd's
  algorithm instead: the forward and input gradient by F(4x4, 3x3) (4x fewer multiply-adds than the direct
  conv), the weight gradient by F(2x2, 3x3) (2.25x fewer).
* :func:`warp_sample`: ``fastclr.warp.FusedWarp``'s grid, frame weight and bilinear sampling in one pass.
* :func:`thickness`: ``fastclr.augment.RandomThickness``'s max filter, only on the samples it changes.
* :func:`blur3`: ``fastclr.augment.RandomBlur``'s 3-tap Gaussian, both axes in one pass per image.
* :func:`color_jitter`: ``fastclr.color.RandomColor``'s four jitters and greyscale, two passes per image.

Each is a ``torch.library`` custom op (``torch.ops.fastclr.*``: schema, fake function, autograd formula), so
``torch.compile`` keeps them as single ops instead of tracing into ctypes, and their OpenMP team follows
``torch.set_num_threads``.

Why they are faster than ATen (the C file's header says how): one pass each way, uint8 window indices, ReLU
folded in, no intermediate maps. ``benchmarks/bench_kernels.py`` times each against ATen
(benchmarks/results/).

The kernels are built once per machine with the system C compiler (``$CC``, default ``cc``; ~1 s) into
``$FASTCLR_CACHE`` (default ``~/.cache/fastclr``), keyed by the source and the CPU. Where that fails (no
compiler, not Linux) :func:`load` warns once and returns None; ``fastclr.backend`` then leaves them off and
the encoders run their ATen layers. ``FASTCLR_CPU_KERNELS=0`` switches them off by hand.

Numerics: fp32 arithmetic throughout. Under bf16 autocast the first block's output is bf16 like ATen's,
but its conv is computed from fp32 inputs and weights, where ATen rounds them to bf16 first (so it is
the more accurate of the two; tests/test_kernels.py checks both against float64).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
MAX_WIDTH = 256     # widest image row the augmentation kernels take (MAX_W in the C file: row buffers on the stack)
_DTYPES = (torch.float32, torch.bfloat16)


def cache_dir() -> Path:
    root = os.environ.get("FASTCLR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fastclr"
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another (shared homes)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cc: str, out: Path) -> str | None:
    """Compile the kernels into ``out``; returns None, or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(target)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd)}: {exc}"
        if r.returncode != 0:
            return f"{' '.join(cmd)}:\n{r.stderr[-1500:]}"
        os.replace(target, out)                     # atomic: parallel first uses never load a half-written file
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.pool_relu_fwd.argtypes = [P, I, I, I, I, I, P, I, P]
    lib.pool_relu_bwd.argtypes = [P, I, P, I, P, I, I, I, I, P, I]
    lib.conv1_pool_relu_fwd.argtypes = [P, I, I, I, P, P, I, F, F, P, I, P]
    lib.conv1_pool_relu_bwd.argtypes = [P, I, I, I, I, F, F, P, I, P, I, P, P, P, I]
    lib.warp_sample.argtypes = [P, I, I, I, I, I, I, P, I, P, P, P, I, F, F, I, P]
    lib.thickness.argtypes = [P, I, I, I, P, P]
    lib.color_jitter.argtypes = [P, I, I, I, P, P]
    lib.blur3.argtypes = [P, ctypes.c_long, I, I, P, P]
    lib.normalize_nhwc.argtypes = [P, ctypes.c_long, I, P, P, P, I]
    lib.normalize_nhwc.restype = None
    lib.blur3.restype = None
    lib.color_jitter.restype = None
    lib.bn_act_forward.argtypes = [P, I, I, I, I, I, P, P, F, I, P, P, P, P, P, P, I]
    lib.bn_act_backward.argtypes = [P, I, I, I, I, I, P, P, F, I, P, P, P, P, P, P, P, P, P, I]
    lib.bn_act_forward.restype = lib.bn_act_backward.restype = ctypes.c_int
    lib.stem_forward.argtypes = [P, P, P, I, I, I, I, P, I, P, P, F, P, P, P, P, P, P, P, P, I]
    lib.stem_backward.argtypes = [P, P, P, I, I, I, I, I, P, P, F, P, P, P, P, P, P, P, P, P, P, I]
    lib.stem_gram_scratch.argtypes = [I, I]
    lib.stem_gram_scratch.restype = ctypes.c_long
    lib.stem_forward.restype = lib.stem_backward.restype = lib.has_bf16_dot.restype = ctypes.c_int
    lib.has_bf16_dot.argtypes = []
    lib.conv3x3_wgrad.argtypes = [P, P, I, I, I, I, I, P, P, I]
    lib.conv3x3_wgrad.restype = ctypes.c_int
    lib.conv3x3_wgrad_scratch.argtypes = [I, I, I, I]
    lib.conv3x3_wgrad_scratch.restype = ctypes.c_long
    lib.conv3x3_wgrad_f32.argtypes = [P, P, I, I, I, I, I, P, P, I]
    lib.conv3x3_wgrad_f32.restype = ctypes.c_int
    lib.conv3x3_wgrad_f32_scratch.argtypes = [I, I]
    lib.conv3x3_wgrad_f32_scratch.restype = ctypes.c_long
    lib.conv3x3_winograd_f32.argtypes = [P, P, I, I, I, I, I, P, P, I]
    lib.conv3x3_winograd_f32.restype = ctypes.c_int
    lib.conv3x3_winograd_f32_scratch.argtypes = [I]
    lib.conv3x3_winograd_f32_scratch.restype = ctypes.c_long
    lib.conv3x3_winograd_wgrad_f32.argtypes = [P, P, I, I, I, I, I, P, P, I]
    lib.conv3x3_winograd_wgrad_f32.restype = ctypes.c_int
    lib.conv3x3_winograd_wgrad_f32_scratch.argtypes = [I, I]
    lib.conv3x3_winograd_wgrad_f32_scratch.restype = ctypes.c_long
    lib.winograd_weight_f32.argtypes = [P, I, I, P]
    lib.winograd_weight_f32.restype = None
    lib.native_lanes.argtypes = []
    lib.native_lanes.restype = ctypes.c_int
    lib.set_threads.argtypes, lib.team_size.argtypes = [I], []
    lib.pool_relu_fwd.restype = lib.pool_relu_bwd.restype = lib.warp_sample.restype = lib.thickness.restype = None
    lib.set_threads.restype = None
    lib.conv1_pool_relu_fwd.restype = lib.conv1_pool_relu_bwd.restype = lib.team_size.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call, then cached on disk), or None where they cannot be built."""
    if not sys.platform.startswith("linux"):
        return None                                  # OpenMP must be the libgomp PyTorch already loaded
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = cache_dir() / f"cpu_kernels-{key}.so"
    if not path.is_file():
        err = _build(cc, path)
        if err is not None:
            warnings.warn(f"fastclr's CPU kernels could not be built, so the encoders use PyTorch's layers "
                          f"(slower on CPU, same results). {err}", stacklevel=2)
            return None
    try:
        lib = _declare(ctypes.CDLL(str(path)))
    except OSError as exc:
        warnings.warn(f"fastclr's CPU kernels at {path} did not load ({exc}); using PyTorch's layers", stacklevel=2)
        return None
    return lib if _self_check(lib) else None


def _self_check(lib: ctypes.CDLL) -> bool:
    """One tiny pool against ATen, so a miscompiled library is never used (called by load(): the C function
    directly, not the operator, which would call load() again)."""
    x = torch.randn(2, 16, 4, 4)
    xh = _nhwc(x)                                    # held: a temporary's pointer would dangle in the call
    out, idx = torch.empty(2, 2, 2, 16), torch.empty(2, 2, 2, 16, dtype=torch.uint8)
    lib.pool_relu_fwd(xh.data_ptr(), 0, 2, 4, 4, 16, out.data_ptr(), 0, idx.data_ptr())
    ok = torch.equal(out.permute(0, 3, 1, 2), torch.relu(torch.nn.functional.max_pool2d(x, 2)))
    if not ok:
        warnings.warn("fastclr's CPU kernels failed their self-check; using PyTorch's layers", stacklevel=3)
    return ok


@torch.compiler.assume_constant_result   # torch.compile reads it once at trace time instead of tracing load()
def available() -> bool:
    return load() is not None


# --------------------------------------------------------------------------- autocast helpers

def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of the enclosing CPU autocast region, or None outside one."""
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:                                # torch < 2.4
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if on else None


def _nhwc(t: Tensor) -> Tensor:
    """(N, C, H, W) -> its (N, H, W, C) view, contiguous (free for a channels_last tensor)."""
    t = t.permute(0, 2, 3, 1)
    return t if t.is_contiguous() else t.contiguous()


def _is_bf16(t: Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


# --------------------------------------------------------------------------- the kernels as PyTorch operators
#
# Each kernel is a torch.library custom op (``torch.ops.fastclr.*``) with a schema, a fake (meta) function
# and, where training needs one, an autograd formula, so torch.compile traces through them as single ops and
# ``torch.library.opcheck`` checks the registrations (tests/test_kernels.py). Tensors cross into C by
# pointer; the schema fixes what each argument is. Every call first sets the kernels' OpenMP team to
# torch.get_num_threads(), so they follow torch.set_num_threads like PyTorch's own ops.

def _lib() -> ctypes.CDLL:
    lib = load()
    lib.set_threads(torch.get_num_threads())
    return lib


def _pooled(n: int, c: int, h2: int, w2: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A pooled map and its uint8 window index, both (N, H/2, W/2, C) contiguous. The ops return these plain
    tensors and the Python wrappers permute them to (N, C, H/2, W/2) channels_last: an op that returns a view
    was traced wrongly by torch.compile in torch 2.5 (tests/test_kernels.py compares with eager)."""
    return torch.empty(n, h2, w2, c, dtype=dtype), torch.empty(n, h2, w2, c, dtype=torch.uint8)


@torch.library.custom_op("fastclr::pool_relu", mutates_args=())
def _pool_relu(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, h, w = x.shape
    out, idx = _pooled(n, c, h // 2, w // 2, x.dtype)
    xh = _nhwc(x)                                    # held: a temporary's pointer would dangle in the call
    _lib().pool_relu_fwd(xh.data_ptr(), _is_bf16(x), n, h, w, c, out.data_ptr(), _is_bf16(out), idx.data_ptr())
    return out, idx


@_pool_relu.register_fake
def _(x):
    n, c, h, w = x.shape
    return x.new_empty(n, h // 2, w // 2, c), x.new_empty(n, h // 2, w // 2, c, dtype=torch.uint8)


@torch.library.custom_op("fastclr::pool_relu_backward", mutates_args=())
def _pool_relu_backward(g: Tensor, out: Tensor, idx: Tensor) -> Tensor:
    """g, out, idx (N, H/2, W/2, C) -> the input's gradient (N, H, W, C)."""
    n, h2, w2, c = out.shape
    gh, oh, ih = g.to(out.dtype).contiguous(), out.contiguous(), idx.contiguous()
    gx = torch.empty(n, 2 * h2, 2 * w2, c, dtype=out.dtype)
    _lib().pool_relu_bwd(gh.data_ptr(), _is_bf16(gh), oh.data_ptr(), _is_bf16(oh), ih.data_ptr(),
                         n, 2 * h2, 2 * w2, c, gx.data_ptr(), _is_bf16(gx))
    return gx


@_pool_relu_backward.register_fake
def _(g, out, idx):
    n, h2, w2, c = out.shape
    return out.new_empty(n, 2 * h2, 2 * w2, c)


def _pool_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)


def _pool_relu_grad(ctx, g_out, g_idx):
    out, idx = ctx.saved_tensors
    return _pool_relu_backward(g_out, out, idx).permute(0, 3, 1, 2)


_pool_relu.register_autograd(_pool_relu_grad, setup_context=_pool_relu_setup)


def pool_relu_supported(x: Tensor) -> bool:
    """Shapes and dtypes the pool kernel takes: CPU, (N, C, H, W) f32/bf16, C % 16 == 0, even H and W."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _DTYPES and x.shape[1] % 16 == 0
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.numel() > 0 and available())


def pool_relu(x: Tensor) -> Tensor:
    """``relu(max_pool2d(x, 2))`` for (N, C, H, W) -> (N, C, H/2, W/2) (channels_last); see the module doc."""
    return _pool_relu(x)[0].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- conv 3x3 (1 -> C) + pool + ReLU

@torch.library.custom_op("fastclr::conv3x3_pool_relu", mutates_args=())
def _conv_pool_relu(x: Tensor, weight: Tensor, bias: Tensor, mean: float, std: float,
                    out_bf16: bool) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    c = weight.shape[0]
    xs = x.reshape(n, h, w).float().contiguous()
    taps = weight.float().reshape(c, 9).t().contiguous()                 # (9, C)
    b = bias.float().contiguous()
    out, idx = _pooled(n, c, h // 2, w // 2, torch.bfloat16 if out_bf16 else torch.float32)
    rc = _lib().conv1_pool_relu_fwd(xs.data_ptr(), n, h, w, taps.data_ptr(), b.data_ptr(), c, mean, 1 / std,
                                    out.data_ptr(), _is_bf16(out), idx.data_ptr())
    if rc != 0:
        raise ValueError("conv3x3_pool_relu called on an unsupported shape (see conv3x3_pool_relu_supported)")
    return out, idx


@_conv_pool_relu.register_fake
def _(x, weight, bias, mean, std, out_bf16):
    n, _, h, w = x.shape
    c = weight.shape[0]
    out = x.new_empty(n, h // 2, w // 2, c, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    return out, x.new_empty(n, h // 2, w // 2, c, dtype=torch.uint8)


@torch.library.custom_op("fastclr::conv3x3_pool_relu_backward", mutates_args=())
def _conv_pool_relu_backward(g: Tensor, x: Tensor, out: Tensor, idx: Tensor, mean: float,
                             std: float) -> tuple[Tensor, Tensor]:
    n, _, h, w = x.shape
    c = out.shape[-1]                                   # out, idx, g: (N, H/2, W/2, C)
    xs = x.reshape(n, h, w).float().contiguous()
    gh, oh, idx = g.to(out.dtype).contiguous(), out.contiguous(), idx.contiguous()
    chunks = max(1, min(torch.get_num_threads(), n))   # one partial sum per thread: no atomics
    gtaps, gbias = torch.empty(chunks, 9, c), torch.empty(chunks, c)
    rc = _lib().conv1_pool_relu_bwd(xs.data_ptr(), n, h, w, c, mean, 1 / std, gh.data_ptr(), _is_bf16(gh),
                                    oh.data_ptr(), _is_bf16(oh), idx.data_ptr(), gtaps.data_ptr(),
                                    gbias.data_ptr(), chunks)
    if rc != 0:
        raise ValueError("conv3x3_pool_relu backward called on an unsupported shape")
    return gtaps.sum(0).t().reshape(c, 1, 3, 3).contiguous(), gbias.sum(0)   # strides as the fake says


@_conv_pool_relu_backward.register_fake
def _(g, x, out, idx, mean, std):
    c = out.shape[-1]
    return x.new_empty(c, 1, 3, 3), x.new_empty(c)


def _conv_setup(ctx, inputs, output):
    x, _, _, mean, std, _ = inputs
    ctx.save_for_backward(x, *output)
    ctx.mean_std = (mean, std)


def _conv_grad(ctx, g_out, g_idx):
    x, out, idx = ctx.saved_tensors
    gw, gb = _conv_pool_relu_backward(g_out, x, out, idx, *ctx.mean_std)
    return None, gw, gb, None, None, None


_conv_pool_relu.register_autograd(_conv_grad, setup_context=_conv_setup)


def conv3x3_pool_relu_supported(x: Tensor, conv: nn.Conv2d) -> bool:
    """The first block's kernel takes a CPU f32 (N, 1, H, W) input that needs no gradient (the augmented
    views), H and W even and <= 64, and a Conv2d(1, C, 3, padding=1) with bias, C % 16 == 0, C <= 64."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and x.shape[1] == 1
            and not x.requires_grad and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and 0 < x.shape[2] <= 64 and 0 < x.shape[3] <= 64 and x.shape[0] > 0
            and conv.in_channels == 1 and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.bias is not None
            and conv.out_channels % 16 == 0 and conv.out_channels <= 64
            and conv.weight.device.type == "cpu" and _cpu_autocast_dtype() in (None, torch.bfloat16)
            and available())


def conv3x3_pool_relu(x: Tensor, conv: nn.Conv2d, mean: float, std: float) -> Tensor:
    """``relu(max_pool2d(conv((x - mean) / std), 2))`` for (N, 1, H, W) -> (N, C, H/2, W/2) (channels_last);
    bf16 inside a bf16 autocast region, else f32. Check :func:`conv3x3_pool_relu_supported` first."""
    return _conv_pool_relu(x, conv.weight, conv.bias, float(mean), float(std),
                           _cpu_autocast_dtype() == torch.bfloat16)[0].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- training BatchNorm + pool + ReLU

BN_RELU, BN_MAXPOOL_RELU, BN_RELU_AVGPOOL = 0, 1, 2      # bn_act's modes (the C file's header says what each is)


def _bn_out_shape(y: Tensor, mode: int) -> tuple[int, int, int, int]:
    n, c, h, w = y.shape
    s = 1 if mode == BN_RELU else 2
    return n, h // s, w // s, c


def _partial_threads(chunks: int) -> int:
    """How many per-thread partial sums the C side makes: one per thread, and no more than the ``chunks`` its loop
    splits the work into."""
    return max(1, min(torch.get_num_threads(), chunks))


@torch.library.custom_op("fastclr::bn_act", mutates_args=())
def _bn_act(y: Tensor, weight: Tensor, bias: Tensor, eps: float,
            mode: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y (N, C, H, W) -> out (N, H', W', C) in y's dtype; for BN_MAXPOOL_RELU (else empty) idx, each window's
    choice (N, H', W', C) uint8 (4 where the ReLU gives 0), and ymax, the chosen y (N, H', W', C); the batch mean
    (C,) and biased variance (C,), f32. One C call: statistics, BN's affine form, the apply pass."""
    n, c, h, w = y.shape
    yh = _nhwc(y)                                    # held: a temporary's pointer would dangle in the call
    wt, bs = weight.float().contiguous(), bias.float().contiguous()
    t = _partial_threads(n * h * w // 16)             # the statistics pass splits the pixels
    part = torch.empty(t, 3, c, dtype=torch.float64)  # per thread: sums of y - K, of (y - K)^2, and K
    pooled = _bn_out_shape(y, mode) if mode == BN_MAXPOOL_RELU else (0,)
    out = torch.empty(_bn_out_shape(y, mode), dtype=y.dtype)
    idx, ymax = torch.empty(pooled, dtype=torch.uint8), torch.empty(pooled, dtype=y.dtype)
    mean, var = torch.empty(c), torch.empty(c)
    if _lib().bn_act_forward(yh.data_ptr(), _is_bf16(y), n, h, w, c, wt.data_ptr(), bs.data_ptr(), eps, mode,
                             out.data_ptr(), idx.data_ptr(), ymax.data_ptr(), mean.data_ptr(), var.data_ptr(),
                             part.data_ptr(), t) != 0:
        raise ValueError("bn_act called on an unsupported shape (see bn_act_supported)")
    return out, idx, ymax, mean, var


@_bn_act.register_fake
def _(y, weight, bias, eps, mode):
    c, shape = y.shape[1], _bn_out_shape(y, mode)
    pooled = shape if mode == BN_MAXPOOL_RELU else (0,)
    return (y.new_empty(shape), y.new_empty(pooled, dtype=torch.uint8), y.new_empty(pooled),
            y.new_empty(c, dtype=torch.float32), y.new_empty(c, dtype=torch.float32))


@torch.library.custom_op("fastclr::bn_act_backward", mutates_args=())
def _bn_act_backward(g: Tensor, y: Tensor, idx: Tensor, ymax: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                     var: Tensor, eps: float, mode: int) -> tuple[Tensor, Tensor, Tensor]:
    """g (N, H', W', C), y (N, C, H, W) and the forward's idx, ymax, mean and var -> dy (N, H, W, C) in y's dtype,
    dweight (C,), dbias (C,).

    With gz the gradient at z (ReLU's mask and the pool's routing applied to g), M = N H W and
    xhat = (y - mean) * invstd: dbias = sum gz, dweight = sum gz xhat, and
    dy = scale * (gz - dbias / M - xhat * dweight / M), written as scale * gz + b * (y - mean) + c."""
    n, c, h, w = y.shape
    yh, gh, idx, ymax = _nhwc(y), g.to(y.dtype).contiguous(), idx.contiguous(), ymax.contiguous()
    wt, bs = weight.float().contiguous(), bias.float().contiguous()
    mean, var = mean.float().contiguous(), var.float().contiguous()
    t = _partial_threads(gh.shape[0] * gh.shape[1])    # the sums pass splits the output rows
    part = torch.empty(t, 2, c, dtype=torch.float64)
    dy = torch.empty(n, h, w, c, dtype=y.dtype)
    dweight, dbias = torch.empty(c), torch.empty(c)
    if _lib().bn_act_backward(yh.data_ptr(), _is_bf16(y), n, h, w, c, wt.data_ptr(), bs.data_ptr(), eps, mode,
                              idx.data_ptr(), ymax.data_ptr(), gh.data_ptr(), mean.data_ptr(), var.data_ptr(),
                              dy.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), part.data_ptr(), t) != 0:
        raise ValueError("bn_act backward called on an unsupported shape")
    return dy, dweight.to(weight.dtype), dbias.to(bias.dtype)


@_bn_act_backward.register_fake
def _(g, y, idx, ymax, weight, bias, mean, var, eps, mode):
    n, c, h, w = y.shape
    return y.new_empty(n, h, w, c), torch.empty_like(weight), torch.empty_like(bias)


def _bn_act_setup(ctx, inputs, output):
    y, weight, bias, eps, mode = inputs
    _, idx, ymax, mean, var = output
    ctx.mark_non_differentiable(idx, ymax, mean, var)
    ctx.set_materialize_grads(False)       # else every step allocates and zero-fills a gradient for ymax
    ctx.save_for_backward(y, idx, ymax, weight, bias, mean, var)
    ctx.eps_mode = (eps, mode)


def _bn_act_grad(ctx, g_out, g_idx, g_ymax, g_mean, g_var):
    if g_out is None:                      # the output unused: no gradient anywhere
        return None, None, None, None, None
    y, idx, ymax, weight, bias, mean, var = ctx.saved_tensors
    dy, dweight, dbias = _bn_act_backward(g_out, y, idx, ymax, weight, bias, mean, var, *ctx.eps_mode)
    return dy.permute(0, 3, 1, 2), dweight, dbias, None, None


_bn_act.register_autograd(_bn_act_grad, setup_context=_bn_act_setup)


def bn_act_supported(x: Tensor, bn: nn.Module, mode: int) -> bool:
    """The fused BN kernel takes a training-mode ``BatchNorm2d`` (affine, running statistics, a momentum) on a CPU
    (N, C, H, W) f32/bf16 input with C % 16 == 0, C <= 512, more than one value per channel, and even H and W
    where it pools. In eval mode BN uses its running statistics: the encoder's ATen layers run then."""
    return (_bn_module_ok(bn) and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _DTYPES
            and x.shape[1] % 16 == 0 and x.shape[1] <= 512 and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and (mode == BN_RELU or (x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)) and available())


def _bn_module_ok(bn: nn.Module) -> bool:
    """A training-mode BatchNorm2d the fused kernels can stand in for: affine, running statistics, a momentum."""
    return (isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn.momentum is not None and bn.weight.dtype == torch.float32 and bn.weight.device.type == "cpu")


def bn_act(x: Tensor, bn: nn.BatchNorm2d, mode: int) -> Tensor:
    """Training-mode ``bn`` followed by, per ``mode``: ``relu`` (BN_RELU), ``relu(max_pool2d(., 2))``
    (BN_MAXPOOL_RELU) or ``avg_pool2d(relu(.), 2)`` (BN_RELU_AVGPOOL), as one op each way; ``bn``'s running
    statistics are updated as ``nn.BatchNorm2d`` updates them. (N, C, H, W) -> (N, C, H', W') channels_last, in
    x's dtype. Check :func:`bn_act_supported` first."""
    out, _, _, mean, var = _bn_act(x, bn.weight, bn.bias, float(bn.eps), mode)
    _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return out.permute(0, 3, 1, 2)


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, values: int) -> None:
    """``bn``'s running statistics after a batch of ``values`` values per channel with this mean and biased
    variance, as ATen updates them."""
    with torch.no_grad():
        bn.running_mean.lerp_(mean, bn.momentum)
        bn.running_var.lerp_(var * (values / (values - 1)), bn.momentum)     # the unbiased variance, as ATen
        bn.num_batches_tracked.add_(1)


# --------------------------------------------------------------------------- the cnn's first stage, whole

STEM_MAX_IN, STEM_MAX_OUT, _STEM_SLACK = 4, 64, 16     # the C file's STEM_MAX_CIN, STEM_MAX_COUT, STEM_SLACK


@torch.library.custom_op("fastclr::stem", mutates_args=())
def _stem(x: Tensor, conv_weight: Tensor, weight: Tensor, bias: Tensor, eps: float, x_mean: Tensor | None,
          x_std: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (N, Cin, H, W): bf16, normalised; or with x_mean and x_std (one value, or one per channel), the raw f32
    images, normalised here as :func:`normalize` does -> out (N, H/2, W/2, Cout) bf16, idx and ymax as bn_act's
    BN_MAXPOOL_RELU outputs, the batch mean (Cout,) and biased variance (Cout,) of the conv output (f32), and for
    the backward xp, the normalised input padded (flat bf16), and gram, the second moments and the sum of its 3x3
    patches ((Q + 1) * Q float64, Q = 9 Cin). conv_weight (Cout, Cin, 3, 3) f32; weight, bias: BN's (Cout,)."""
    n, cin, h, w = x.shape
    cout = conv_weight.shape[0]
    if x_mean is None:
        xh, m, sd = _nhwc(x), None, None
    else:                                             # read as (N, C, H, W) f32 by the C side
        xh = x.float().contiguous()
        m = x_mean.float().reshape(-1).expand(cin).contiguous()
        sd = x_std.float().reshape(-1).expand(cin).contiguous()
    cw = conv_weight.float().contiguous()
    wt, bs = weight.float().contiguous(), bias.float().contiguous()
    t = _partial_threads(n)                           # the patches' moments split the images
    part = torch.empty(t, _lib().stem_gram_scratch(w, cin), dtype=torch.float64)
    xp = torch.empty(n * (h + 2) * (w + 2) * cin + _STEM_SLACK, dtype=torch.bfloat16)
    gram = torch.empty((9 * cin + 1) * 9 * cin, dtype=torch.float64)
    out, idx = _pooled(n, cout, h // 2, w // 2, torch.bfloat16)
    ymax = torch.empty_like(out)
    mean, var = torch.empty(cout), torch.empty(cout)
    if _lib().stem_forward(xh.data_ptr(), None if m is None else m.data_ptr(), None if sd is None else sd.data_ptr(),
                           n, h, w, cin, cw.data_ptr(), cout, wt.data_ptr(), bs.data_ptr(), eps,
                           xp.data_ptr(), gram.data_ptr(), out.data_ptr(), idx.data_ptr(), ymax.data_ptr(),
                           mean.data_ptr(), var.data_ptr(), part.data_ptr(), t) != 0:
        raise ValueError("stem called on an unsupported shape (see stem_supported)")
    return out, idx, ymax, mean, var, xp, gram


@_stem.register_fake
def _(x, conv_weight, weight, bias, eps, x_mean, x_std):
    n, cin, h, w = x.shape
    cout = conv_weight.shape[0]
    shape = (n, h // 2, w // 2, cout)
    return (x.new_empty(shape, dtype=torch.bfloat16), x.new_empty(shape, dtype=torch.uint8),
            x.new_empty(shape, dtype=torch.bfloat16),
            x.new_empty(cout, dtype=torch.float32), x.new_empty(cout, dtype=torch.float32),
            x.new_empty(n * (h + 2) * (w + 2) * cin + _STEM_SLACK, dtype=torch.bfloat16),
            x.new_empty((9 * cin + 1) * 9 * cin, dtype=torch.float64))


@torch.library.custom_op("fastclr::stem_backward", mutates_args=())
def _stem_backward(g: Tensor, xp: Tensor, gram: Tensor, idx: Tensor, ymax: Tensor, conv_weight: Tensor,
                   weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """g (N, H/2, W/2, Cout) and the forward's saved tensors -> the gradients of conv_weight, weight and bias (the
    input's is never needed: it is the normalised views). BN's backward as bn_act_backward's; the conv's weight
    gradient from one pass over the routed output gradient and the patches, plus the terms gram gives: the conv
    output and its gradient are never formed."""
    n, h2, w2, cout = g.shape
    h, w, cin = 2 * h2, 2 * w2, conv_weight.shape[1]
    gh = g.to(torch.bfloat16).contiguous()
    cw = conv_weight.float().contiguous()
    wt, bs = weight.float().contiguous(), bias.float().contiguous()
    mean, var = mean.float().contiguous(), var.float().contiguous()
    t = _partial_threads(n * h2)                      # both passes split the pooled rows
    part = torch.empty(t, 9 * cin, cout, dtype=torch.float64)
    xi = torch.empty(n * (h + 2) * (w + 2) * cin, dtype=torch.int32)
    dcw, dweight, dbias = torch.empty(cout, cin, 3, 3), torch.empty(cout), torch.empty(cout)
    if _lib().stem_backward(xp.data_ptr(), gram.data_ptr(), cw.data_ptr(), n, h, w, cin, cout, wt.data_ptr(),
                            bs.data_ptr(), eps, idx.contiguous().data_ptr(), ymax.contiguous().data_ptr(),
                            gh.data_ptr(), mean.data_ptr(), var.data_ptr(), xi.data_ptr(), dcw.data_ptr(),
                            dweight.data_ptr(), dbias.data_ptr(), part.data_ptr(), t) != 0:
        raise ValueError("stem backward called on an unsupported shape")
    return dcw.to(conv_weight.dtype), dweight.to(weight.dtype), dbias.to(bias.dtype)


@_stem_backward.register_fake
def _(g, xp, gram, idx, ymax, conv_weight, weight, bias, mean, var, eps):
    return torch.empty_like(conv_weight), torch.empty_like(weight), torch.empty_like(bias)


def _stem_setup(ctx, inputs, output):
    _, conv_weight, weight, bias, eps, _, _ = inputs
    _, idx, ymax, mean, var, xp, gram = output
    ctx.mark_non_differentiable(idx, ymax, mean, var, xp, gram)
    # else every step allocates and zero-fills gradients for ymax, xp and gram (ymax: a quarter of the conv output)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(xp, gram, idx, ymax, conv_weight, weight, bias, mean, var)
    ctx.eps = eps


def _stem_grad(ctx, g_out, g_idx, g_ymax, g_mean, g_var, g_xp, g_gram):
    if g_out is None:
        return None, None, None, None, None, None, None
    xp, gram, idx, ymax, conv_weight, weight, bias, mean, var = ctx.saved_tensors
    dcw, dweight, dbias = _stem_backward(g_out, xp, gram, idx, ymax, conv_weight, weight, bias, mean, var, ctx.eps)
    return None, dcw, dweight, dbias, None, None, None


_stem.register_autograd(_stem_grad, setup_context=_stem_setup)


@torch.compiler.assume_constant_result
def has_bf16_dot() -> bool:
    """Whether the kernels' bf16 dot products are AVX512-BF16 instructions here. :func:`stem` and
    :func:`conv3x3` are correct without them but slow, so the encoder uses them only where this holds."""
    return available() and bool(load().has_bf16_dot())


@torch.compiler.assume_constant_result
def native_lanes() -> int:
    """Floats in the kernels' native vector (8 with AVX2, 16 with AVX-512); 0 where the kernels are not built."""
    return int(load().native_lanes()) if available() else 0


def _is_conv3x3_same(conv: nn.Module) -> bool:
    """A plain 3x3 ``Conv2d``: stride 1, zero padding 1, no bias, no groups or dilation, f32 weights."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros" and conv.weight.dtype == torch.float32)


def stem_supported(x: Tensor, conv: nn.Module, bn: nn.Module, raw: bool = False) -> bool:
    """The stem kernel takes a CPU (N, Cin, H, W) input needing no gradient, Cin <= 4, even H and W, each <= 64: bf16 (the
    normalised views under bf16 autocast) or, ``raw``, the f32 views it normalises itself under bf16 autocast;
    through a 3x3 ``Conv2d`` (stride 1, padding 1, no bias, f32 weights) to Cout % 16 == 0, Cout <= 64 channels,
    and a BatchNorm2d bn_act takes."""
    dtype_ok = (x.dtype == torch.float32 and _cpu_autocast_dtype() == torch.bfloat16) if raw \
        else x.dtype == torch.bfloat16
    return (_is_conv3x3_same(conv) and dtype_ok and not x.requires_grad and x.dim() == 4
            and 1 <= x.shape[1] <= STEM_MAX_IN and x.shape[1] == conv.in_channels
            and conv.out_channels % 16 == 0 and conv.out_channels <= STEM_MAX_OUT
            and x.device.type == "cpu" and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 and x.shape[2] <= 64 and x.shape[3] <= 64
            and x.shape[0] * x.shape[2] * x.shape[3] > 1 and _bn_module_ok(bn) and available())


def stem(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, mean: Tensor | None = None,
         std: Tensor | None = None) -> Tensor:
    """``relu(max_pool2d(bn(conv(x)), 2))`` in training mode as one op each way, ``bn``'s running statistics
    updated as ``nn.BatchNorm2d`` updates them. With ``mean`` and ``std``, x is the raw f32 images and the op
    starts with ``(x - mean) / std`` rounded to bf16 (what :func:`normalize` and autocast's cast would give).
    (N, Cin, H, W) -> (N, Cout, H/2, W/2) bf16 channels_last. Check :func:`stem_supported` first."""
    out, _, _, mean_, var, _, _ = _stem(x, conv.weight, bn.weight, bn.bias, float(bn.eps), mean, std)
    _update_running_stats(bn, mean_, var, x.shape[0] * x.shape[2] * x.shape[3])
    return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- a 3x3 conv's weight gradient

@torch.library.custom_op("fastclr::conv3x3_wgrad", mutates_args=())
def _conv3x3_wgrad(g: Tensor, x: Tensor, winograd: bool) -> Tensor:
    """g (N, Co, H, W) and x (N, Ci, H, W), both bf16 or both f32 -> the gradient (Co, Ci, 3, 3) f32 of a 3x3 conv's
    weight (stride 1, zero padding 1, no bias) whose output gradient is g, summed in f32 (ATen's under bf16 autocast
    is rounded to bf16): directly, or (f32, ``winograd``) as the transpose of Winograd's F(2x2, 3x3)."""
    if winograd:
        return _winograd_wgrad(g, x)
    n, ci, h, w = x.shape
    co = g.shape[1]
    xh, gh = _nhwc(x), _nhwc(g.to(x.dtype))
    t = _partial_threads(n)                           # the loop splits the images
    lib = _lib()
    f32 = x.dtype == torch.float32
    per = lib.conv3x3_wgrad_f32_scratch(ci, co) if f32 else lib.conv3x3_wgrad_scratch(h, w, ci, co)
    scratch = torch.empty(t * per)
    dw = torch.empty(co, ci, 3, 3)
    call = lib.conv3x3_wgrad_f32 if f32 else lib.conv3x3_wgrad
    if call(xh.data_ptr(), gh.data_ptr(), n, h, w, ci, co, dw.data_ptr(), scratch.data_ptr(), t) != 0:
        raise ValueError("conv3x3_wgrad called on an unsupported shape (see conv3x3_supported)")
    return dw


@_conv3x3_wgrad.register_fake
def _(g, x, winograd):
    return x.new_empty(g.shape[1], x.shape[1], 3, 3, dtype=torch.float32)


def winograd_weight(weight: Tensor) -> Tensor:
    """(Co, Ci, 3, 3) f32 -> U = G w G^T of F(4x4, 3x3), packed (Co / 16, 36, Ci, 16) as ``conv3x3_winograd_f32``
    reads it: the 36 transformed positions of one block of 16 output channels in one contiguous run. In C, in one
    pass (tests/test_kernels.py checks it against the two-sided product in float64)."""
    w = weight.contiguous()
    co, ci = w.shape[:2]
    u = torch.empty(co // 16, 36, ci, 16)
    _lib().winograd_weight_f32(w.data_ptr(), co, ci, u.data_ptr())
    return u


def _winograd_tiles(x: Tensor, m: int) -> int:
    """m x m output tiles of x (N, C, H, W)"""
    return x.shape[0] * -(-x.shape[2] // m) * -(-x.shape[3] // m)


def _winograd_wgrad(g: Tensor, x: Tensor) -> Tensor:
    """g (N, Co, H, W) and x (N, Ci, H, W) f32 -> dW (Co, Ci, 3, 3) f32 = G^T dU G by F(2x2, 3x3), dU the sum of the
    threads' 16 GEMMs over their tiles (the C file says how). Ci and Co multiples of 16."""
    n, ci, h, w = x.shape
    co = g.shape[1]
    xh, gh = _nhwc(x), _nhwc(g)
    t = _partial_threads(_winograd_tiles(x, 2))
    lib = _lib()
    scratch = torch.empty(t * lib.conv3x3_winograd_wgrad_f32_scratch(ci, co))
    dw = torch.empty(co, ci, 3, 3)
    if lib.conv3x3_winograd_wgrad_f32(xh.data_ptr(), gh.data_ptr(), n, h, w, ci, co, dw.data_ptr(), scratch.data_ptr(),
                                      t):
        raise ValueError("conv3x3 by Winograd called on an unsupported shape (see winograd_supported)")
    return dw


def _winograd(x: Tensor, weight: Tensor) -> Tensor:
    """The 3x3 conv (stride 1, padding 1) of x (N, Ci, H, W) f32 with weight (Co, Ci, 3, 3) f32 by Winograd's
    F(4x4, 3x3) (the C file says why it is faster) -> (N, Co, H, W) channels_last. Ci and Co multiples of 16."""
    n, ci, h, w = x.shape
    co = weight.shape[0]
    xh, u = _nhwc(x), winograd_weight(weight)
    t = _partial_threads(_winograd_tiles(x, 4))
    lib = _lib()
    scratch = torch.empty(t * lib.conv3x3_winograd_f32_scratch(ci))
    y = torch.empty(n, h, w, co)
    if lib.conv3x3_winograd_f32(xh.data_ptr(), u.data_ptr(), n, h, w, ci, co, y.data_ptr(), scratch.data_ptr(), t):
        raise ValueError("conv3x3 by Winograd called on an unsupported shape (see winograd_supported)")
    return y.permute(0, 3, 1, 2)


@torch.library.custom_op("fastclr::conv3x3", mutates_args=())
def _conv3x3(x: Tensor, weight: Tensor, winograd: bool) -> Tensor:
    """The 3x3 conv (stride 1, padding 1, no bias) of x (N, Ci, H, W) bf16 or f32 with weight (Co, Ci, 3, 3) f32 cast
    to x's dtype (bf16: as under autocast): ATen's, or fastclr's Winograd kernel in f32 (``winograd``); its backward
    takes the weight gradient from :func:`_conv3x3_wgrad`, and under ``winograd`` the input gradient from this op."""
    if winograd:
        return _winograd(x, weight)
    return F.conv2d(x, weight.to(x.dtype), padding=1)


@_conv3x3.register_fake
def _(x, weight, winograd):
    y = x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return y.contiguous(memory_format=torch.channels_last) if winograd or (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) else y


def _conv3x3_setup(ctx, inputs, output):
    x, weight, ctx.winograd = inputs
    ctx.save_for_backward(x, weight)


def _conv3x3_grad(ctx, g):
    x, weight = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and ctx.winograd:
        # a stride-1 'same' conv's input gradient is the conv of g with the filters flipped and in and out swapped
        dx = _conv3x3(g, weight.flip(2, 3).transpose(0, 1), True)
    elif ctx.needs_input_grad[0]:
        dx = torch.ops.aten.convolution_backward(g, x, weight.to(x.dtype), None, [1, 1], [1, 1], [1, 1], False,
                                                 [0, 0], 1, [True, False, False])[0]
    return dx, _conv3x3_wgrad(g, x, ctx.winograd) if ctx.needs_input_grad[1] else None, None


_conv3x3.register_autograd(_conv3x3_grad, setup_context=_conv3x3_setup)


def conv3x3_supported(x: Tensor, conv: nn.Module) -> bool:
    """The weight-gradient kernel takes a 3x3 ``Conv2d`` (stride 1, padding 1, no bias, f32 weights needing a
    gradient) on a bf16 or f32 CPU (N, Ci, H, W) input, Ci % 4 == 0, Co % 16 == 0, W <= 256, while gradients
    are recorded: training. Whether it is faster than ATen's there: :func:`conv3x3_pays`."""
    return (_is_conv3x3_same(conv) and conv.weight.requires_grad and torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 4
            and x.shape[1] == conv.in_channels and x.shape[1] % 4 == 0 and conv.out_channels % 16 == 0
            and x.shape[3] <= 256 and x.shape[0] > 0 and available())


# The f32 weight gradient on the native vector was measured faster than oneDNN's on AVX2 (8 lanes: 1.29-1.37x at the
# cnn's stages 2 and 3, 2-core Zen 3; benchmarks/bench_kernels.py, conv3x3_wgrad-f32-*). It has not been measured
# on an AVX-512 CPU, so there ATen's runs.
F32_WGRAD_LANES = (8,)


def conv3x3_pays(x: Tensor) -> bool:
    """Whether the weight-gradient kernel beats ATen's for ``x``'s dtype on this CPU: bf16 where the dot products
    are one AVX512-BF16 instruction, f32 where it was measured faster (F32_WGRAD_LANES)."""
    if x.dtype == torch.bfloat16:
        return has_bf16_dot()
    # f32 outside autocast only: inside a bf16 region ATen's conv would compute in bf16, and so must this one
    return x.dtype == torch.float32 and _cpu_autocast_dtype() is None and native_lanes() in F32_WGRAD_LANES


# Winograd's f32 conv was measured faster on AVX2 (8 lanes, the cnn's stages 2 and 3, 2-core Zen 3): forward + input
# gradient 1.87-2.17x oneDNN's, weight gradient 1.17-1.46x the direct kernel's (benchmarks/bench_kernels.py,
# conv3x3_winograd-* and conv3x3_wgrad-f32-*). It has not been measured on an AVX-512 CPU, so there ATen's runs.
WINOGRAD_LANES = (8,)


def winograd_supported(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether :func:`conv3x3` computes ``conv(x)`` and its gradients by Winograd: f32 outside autocast, where the
    native vector's width is in WINOGRAD_LANES, Ci and Co multiples of 16 (the input gradient's Co is the conv's
    Ci). Check :func:`conv3x3_supported` first."""
    return (x.dtype == torch.float32 and _cpu_autocast_dtype() is None and native_lanes() in WINOGRAD_LANES
            and conv.in_channels % 16 == 0 and conv.out_channels % 16 == 0)


def conv3x3(x: Tensor, conv: nn.Conv2d, winograd: bool | None = None) -> Tensor:
    """``conv(x)`` (under bf16 autocast: bf16 x and weight), its weight gradient computed by fastclr's kernel (dW
    in f32). With ``winograd`` (default: where :func:`winograd_supported`) all three passes are fastclr's Winograd
    kernels; without, the forward and the input gradient are ATen's and the weight gradient the direct sum.
    (N, Ci, H, W) bf16 or f32 -> (N, Co, H, W) of x's dtype. Check :func:`conv3x3_supported` first."""
    if winograd is None:
        winograd = winograd_supported(x, conv)
    return _conv3x3(x, conv.weight, winograd)


# --------------------------------------------------------------------------- the encoders' input normalisation

def normalize_supported(x: Tensor) -> bool:
    """The normalisation kernel takes a CPU f32 (N, C, H, W) input that needs no gradient (the views)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and not x.requires_grad
            and x.numel() > 0 and available())


@torch.library.custom_op("fastclr::normalize", mutates_args=())
def _normalize(x: Tensor, mean: Tensor, std: Tensor, out_bf16: bool) -> Tensor:
    n, c, h, w = x.shape
    xh = _nhwc(x)
    m = mean.float().reshape(-1).expand(c).contiguous()             # one statistic, or one per channel
    s = std.float().reshape(-1).expand(c).contiguous()
    out = torch.empty(n, h, w, c, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    _lib().normalize_nhwc(xh.data_ptr(), n * h * w, c, m.data_ptr(), s.data_ptr(), out.data_ptr(), int(out_bf16))
    return out


@_normalize.register_fake
def _(x, mean, std, out_bf16):
    n, c, h, w = x.shape
    return x.new_empty(n, h, w, c, dtype=torch.bfloat16 if out_bf16 else torch.float32)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x - mean) / std`` with one statistic or one per channel, (N, C, H, W) -> the same shape channels_last;
    bf16 inside a bf16 autocast region (what the first conv would cast it to), else f32. Check
    :func:`normalize_supported` first."""
    return _normalize(x, mean, std, _cpu_autocast_dtype() == torch.bfloat16).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- FusedWarp's resampling

def view_kernels_supported(x: Tensor) -> bool:
    """The augmentation kernels (warp_sample, thickness) take CPU f32 images that need no gradient, W <= MAX_WIDTH:
    thickness (B, 1, H, W) (its callers pass C channels as C samples), warp_sample any C (check its (B * C, 1, H, W)
    view)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == 1 and x.dtype == torch.float32
            and not x.requires_grad and x.shape[0] > 0 and x.shape[3] <= MAX_WIDTH and available())


@torch.library.custom_op("fastclr::warp_sample", mutates_args=())
def _warp_sample(x: Tensor, core: Tensor, ybasis: Tensor, xbasis: Tensor, frames: Tensor, h: int, w: int,
                 border: bool) -> Tensor:
    b, c, h_in, w_in = x.shape
    r = core.shape[-1]
    x = x.contiguous()
    core, ybasis = core.float().contiguous(), ybasis.float().contiguous()
    xbasis_t = xbasis.new_zeros(r, (w + 15) // 16 * 16)                 # (R, W) zero-padded to whole vectors
    xbasis_t[:, :w] = xbasis.t()
    frames = frames.float().contiguous()
    out = torch.empty(b, c, h, w)
    _lib().warp_sample(x.data_ptr(), b, c, h_in, w_in, h, w, core.data_ptr(), r, ybasis.data_ptr(),
                       xbasis_t.data_ptr(), frames.data_ptr(), frames.shape[1], (w - 1) / 2, (h - 1) / 2,
                       int(border), out.data_ptr())
    return out


@_warp_sample.register_fake
def _(x, core, ybasis, xbasis, frames, h, w, border):
    return x.new_empty(x.shape[0], x.shape[1], h, w)


def warp_sample(x: Tensor, core: Tensor, ybasis: Tensor, xbasis: Tensor, frames: Tensor,
                size: tuple[int, int], border: bool) -> Tensor:
    """``fastclr.warp.FusedWarp``'s grid, frame weight and bilinear ``grid_sample`` (align_corners=True) in
    one pass: the grid is built row by row from its low-rank core and never stored. Shapes as in
    ``fastclr.warp.WarpPlan``; x (B, C, H_in, W_in) -> (B, C, *size), one grid for the C channels."""
    h, w = size
    if core.shape[-1] > 32 or w > MAX_WIDTH:
        raise ValueError(f"warp_sample takes rank <= 32 and width <= {MAX_WIDTH}, got {core.shape[-1]} and {w}")
    return _warp_sample(x, core, ybasis, xbasis, frames, h, w, border)


@torch.library.custom_op("fastclr::thickness", mutates_args=())
def _thickness(x: Tensor, sign: Tensor) -> Tensor:
    b, _, h, w = x.shape
    x = x.contiguous()
    sign = sign.float().contiguous()
    out = torch.empty_like(x)
    _lib().thickness(x.data_ptr(), b, h, w, sign.data_ptr(), out.data_ptr())
    return out


@_thickness.register_fake
def _(x, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def thickness(x: Tensor, sign: Tensor) -> Tensor:
    """RandomThickness's filter: per sample ``sign * max3x3(sign * x)`` (sign +1 dilates, -1 erodes, 0 keeps x),
    edges replicated. x (B, 1, H, W) f32 CPU (check :func:`view_kernels_supported`), sign (B,)."""
    if x.shape[3] > MAX_WIDTH:
        raise ValueError(f"thickness takes width <= {MAX_WIDTH}, got {x.shape[3]}")
    return _thickness(x, sign)


def blur_kernel_supported(x: Tensor) -> bool:
    """The blur kernel takes CPU f32 (B, C, H, W) images that need no gradient, 2 <= H, 2 <= W <= MAX_WIDTH."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and not x.requires_grad
            and x.shape[0] * x.shape[1] > 0 and x.shape[2] >= 2 and 2 <= x.shape[3] <= MAX_WIDTH and available())


@torch.library.custom_op("fastclr::blur3", mutates_args=())
def _blur3(x: Tensor, k: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.contiguous()
    planes = k.float().view(b, 1).expand(b, c).contiguous()          # one k per plane: the sample's
    out = torch.empty_like(x)
    _lib().blur3(x.data_ptr(), b * c, h, w, planes.data_ptr(), out.data_ptr())
    return out


@_blur3.register_fake
def _(x, k):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def blur3(x: Tensor, k: Tensor) -> Tensor:
    """RandomBlur's filter: per sample the 3-tap kernel [k, 1 - 2k, k] along W, then along H, reflected at the
    edges. x (B, C, H, W) f32 CPU (check :func:`blur_kernel_supported`), k (B,) (0: the sample is copied)."""
    return _blur3(x, k)


def color_kernel_supported(x: Tensor) -> bool:
    """The colour kernel takes CPU f32 (B, 1 or 3, H, W) images that need no gradient."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] in (1, 3) and x.dtype == torch.float32
            and not x.requires_grad and x.shape[0] > 0 and available())


@torch.library.custom_op("fastclr::color_jitter", mutates_args=())
def _color_jitter(x: Tensor, params: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x, params = x.contiguous(), params.float().contiguous()
    out = torch.empty_like(x)
    _lib().color_jitter(x.data_ptr(), b, c, h * w, params.data_ptr(), out.data_ptr())
    return out


@_color_jitter.register_fake
def _(x, params):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def color_jitter(x: Tensor, params: Tensor) -> Tensor:
    """``fastclr.color.RandomColor``'s jitter and greyscale: x (B, C, H, W) f32 CPU (check
    :func:`color_kernel_supported`), params (B, 6) = (jittered, brightness, contrast, saturation, hue in turns,
    greyscale), see ``fastclr.color.packed``."""
    return _color_jitter(x, params)


def team_size() -> int:
    """The OpenMP team a kernel runs with now (tests: it follows torch.set_num_threads)."""
    return _lib().team_size()
