"""NT-Xent (normalised temperature-scaled cross entropy), the SimCLR loss: four implementations, and across ranks.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020, eq. (1).
For a batch of N pairs, stack both views into ``z`` of shape (2N, D), L2-normalise, and let
``s_ij = z_i . z_j / t``. Each row i is a (2N-1)-way classification whose target is the other view
``p(i) = (i + N) mod 2N``; self-similarity is removed::

    loss = mean_i [ logsumexp_{j != i} s_ij  -  s_{i, p(i)} ]

Implementations (one signature: ``fn(z1, z2, temperature) -> scalar``):

* ``reference``: the formula above with autograd, plain and readable; the truth the others are tested against.
* ``compiled``: a fused dense kernel through ``torch.compile`` with a hand-derived backward. Faster than the
  reference because the masking, logsumexp and softmax run as fused passes over the (2N, 2N) matrix, and the
  backward needs only the saved softmax P: ``dL/dz`` comes from ``P @ z + P^T @ z`` (s is symmetric) with no
  (2N, 2N) temporaries, where autograd materialises the logits' gradient, the masked copy and the softmax
  backward, each a full pass over the matrix.
* ``tiled``: memory-efficient: walks the upper triangle of the similarity matrix in tiles with an online
  (running-max) logsumexp, keeps O(N) row statistics and recomputes tiles in backward. Peak extra memory
  O(N*D + tile^2) instead of O(N^2).
* ``triton``: the tiled algorithm as two fused Triton kernels (``fastclr.triton_ntxent``): the row
  logsumexps in one pass that never writes the matrix, and dL/dz in one pass that recomputes each tile from
  them. O(N) memory like ``tiled``, without its Python loop of small kernels. CUDA tensors (CPU tensors
  under Triton's interpreter, for tests).
* ``auto``: ``triton``, ``reference`` or ``tiled``, whichever ran fastest on this device for the shape (see
  :func:`resolve_impl`).

Gradient of the loss with respect to the normalised ``z`` (used by ``compiled`` and ``tiled``), with
``P_ij = softmax_j(s_ij)`` (0 on the diagonal) and M = 2N::

    dL/dz = (1 / (t M)) * [ (P + P^T) z  -  2 z[p] ]

All implementations compute in (at least) fp32 with autocast switched off inside, so a bf16/fp16 input gives
a finite fp32 loss and a gradient in the input's dtype. The diagonal is masked with -inf applied *after* the
division by the temperature, never with a large finite constant that could overflow a half type.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("reference", "compiled", "tiled", "triton", "auto")
DEFAULT_TILE = 1024  # 4 MiB fp32 tiles: big enough to keep the matrix products efficient


# --------------------------------------------------------------------------- helpers

def _stack_normalised(z1: Tensor, z2: Tensor) -> Tensor:
    """(N, D), (N, D) -> (2N, D) L2-normalised, in at least fp32."""
    z = torch.cat([z1, z2], dim=0)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return F.normalize(z, dim=1)


def _positive_logits(z: Tensor, inv_t) -> Tensor:
    """s_{i, p(i)}, each row's similarity to its other view: (2N, D) -> (2N,)."""
    return (z * z.roll(z.shape[0] // 2, dims=0)).sum(dim=1) * inv_t


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def validate_pair(z1: Tensor, z2: Tensor, temperature: float) -> None:
    """Raise ValueError for input that has no meaningful NT-Xent."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.dim() != 2 or z2.dim() != 2:
        raise ValueError(f"z1 and z2 must be 2-D (N, D); got shapes {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"NT-Xent needs at least 2 samples per view (else there is no negative); got {z1.shape[0]}")


# --------------------------------------------------------------------------- reference

def ntxent_reference(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Plain NT-Xent with autograd.

    Shape:
        z1, z2: (N, D), the two views' projections. Returns a scalar (fp32 or fp64).
    """
    n = z1.shape[0]
    with _no_autocast(z1.device):
        z = _stack_normalised(z1, z2)                              # (2N, D)
        logits = z @ z.T / temperature                             # (2N, 2N)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))      # -inf: no half-type overflow
        targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # the other view
        return F.cross_entropy(logits, targets)


# --------------------------------------------------------------------------- compiled (dense, fused)

def _dense_forward(z: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    """(M, D) normalised, 0-d 1/t -> (scalar loss, (M, M) softmax P saved for backward)."""
    m = z.shape[0]
    logits = (z @ z.T) * inv_t                                            # (M, M)
    diag = torch.arange(m, device=z.device)
    logits = torch.where(diag[:, None] == diag[None, :], float("-inf"), logits)
    lse = torch.logsumexp(logits, dim=1)                                  # (M,)
    pos = _positive_logits(z, inv_t)                                      # (M,)
    prob = torch.exp(logits - lse[:, None])                               # (M, M), 0 on the diagonal
    return (lse - pos).mean(), prob


def _dense_backward(z: Tensor, prob: Tensor, inv_t: Tensor, grad_out: Tensor) -> Tensor:
    """dL/dz for the normalised (M, D) z, from the saved softmax P alone (s is symmetric).

    ``P @ z + P.T @ z`` as two GEMMs reads P twice and writes nothing of size (M, M); forming ``P + P.T``
    first was slower on the CPU (the transposed read of a 64 MiB matrix misses the cache)."""
    m = z.shape[0]
    g = prob @ z + prob.T @ z - 2 * z.roll(m // 2, dims=0)
    return g * (grad_out * inv_t / m)


@functools.lru_cache(maxsize=None)
def _compiled_kernels():
    """Compile once per process; dynamic shapes so a new batch size does not recompile every step,
    and 1/t travels as a tensor so a new temperature does not recompile either."""
    try:
        fwd = torch.compile(_dense_forward, dynamic=True)
        bwd = torch.compile(_dense_backward, dynamic=True)
        z = F.normalize(torch.randn(6, 3), dim=1)
        inv_t = torch.tensor(2.0)
        loss, prob = fwd(z, inv_t)
        bwd(z, prob, inv_t, torch.tensor(1.0))
        return fwd, bwd
    except Exception as exc:  # no C++ compiler / Triton, unsupported platform, ...
        warnings.warn(f"torch.compile is not usable here ({type(exc).__name__}: {exc}); "
                      "NT-Xent impl='compiled' runs the same fused algorithm eagerly", stacklevel=3)
        return _dense_forward, _dense_backward


class _FusedNTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, inv_t: Tensor) -> Tensor:
        fwd, _ = _compiled_kernels()
        loss, prob = fwd(z, inv_t)
        ctx.save_for_backward(z, prob, inv_t)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, prob, inv_t = ctx.saved_tensors
        _, bwd = _compiled_kernels()
        return bwd(z, prob, inv_t, grad_out), None


def ntxent_compiled(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Fused NT-Xent (torch.compile'd forward and hand-derived backward). Shapes as the reference."""
    with _no_autocast(z1.device):
        z = _stack_normalised(z1, z2)
        inv_t = torch.tensor(1.0 / temperature, dtype=z.dtype, device=z.device)
        return _FusedNTXent.apply(z, inv_t)


# --------------------------------------------------------------------------- tiled (memory-efficient)

def _blocks(m: int, tile: int):
    """Upper-triangle tiles (i0, i1, j0, j1) of an (m, m) matrix, diagonal tiles included."""
    for i0 in range(0, m, tile):
        for j0 in range(i0, m, tile):
            yield i0, min(i0 + tile, m), j0, min(j0 + tile, m)


def _block_logits(z: Tensor, inv_t: float, i0: int, i1: int, j0: int, j1: int) -> Tensor:
    s = (z[i0:i1] @ z[j0:j1].T) * inv_t                      # (ti, tj)
    if i0 == j0:                                              # a diagonal tile is square
        s.fill_diagonal_(float("-inf"))
    return s


def _online_lse_update(run_max: Tensor, run_sum: Tensor, s: Tensor) -> None:
    """Fold a tile's rows (R, C) into running (R,) max / sum-of-exp, in place (flash-attention style)."""
    new_max = torch.maximum(run_max, s.amax(dim=1))
    run_sum.mul_(torch.exp(run_max - new_max)).add_(torch.exp(s - new_max[:, None]).sum(dim=1))
    run_max.copy_(new_max)


class _TiledNTXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, inv_t: float, tile: int) -> Tensor:
        m = z.shape[0]
        # Start from the most negative finite value, not -inf: a 1-row diagonal tile is all -inf and
        # exp(-inf - -inf) would be NaN.
        run_max = torch.full((m,), torch.finfo(z.dtype).min, dtype=z.dtype, device=z.device)
        run_sum = torch.zeros(m, dtype=z.dtype, device=z.device)
        for i0, i1, j0, j1 in _blocks(m, tile):
            s = _block_logits(z, inv_t, i0, i1, j0, j1)
            _online_lse_update(run_max[i0:i1], run_sum[i0:i1], s)
            if j0 != i0:  # the mirrored tile s_JI = s_IJ^T, without recomputing it
                _online_lse_update(run_max[j0:j1], run_sum[j0:j1], s.T)
        lse = run_max + torch.log(run_sum)
        pos = _positive_logits(z, inv_t)
        ctx.save_for_backward(z, lse)
        ctx.inv_t, ctx.tile = inv_t, tile
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        z, lse = ctx.saved_tensors
        inv_t, tile, m = ctx.inv_t, ctx.tile, z.shape[0]
        grad = -2 * z.roll(m // 2, dims=0)
        for i0, i1, j0, j1 in _blocks(m, tile):
            s = _block_logits(z, inv_t, i0, i1, j0, j1)
            w = torch.exp(s - lse[i0:i1, None])               # P_IJ
            if i0 == j0:
                w = w + w.T                                    # P_II + P_II^T
                grad[i0:i1] += w @ z[i0:i1]
            else:
                w += torch.exp(s - lse[None, j0:j1])           # + (P_JI)^T
                grad[i0:i1] += w @ z[j0:j1]
                grad[j0:j1] += w.T @ z[i0:i1]
        return grad * (grad_out * inv_t / m), None, None


def ntxent_tiled(z1: Tensor, z2: Tensor, temperature: float, tile: int = DEFAULT_TILE) -> Tensor:
    """NT-Xent that never materialises the (2N, 2N) matrix. Shapes as the reference; ``tile`` >= 1."""
    with _no_autocast(z1.device):
        z = _stack_normalised(z1, z2)
        return _TiledNTXent.apply(z, 1.0 / temperature, int(tile))


# --------------------------------------------------------------------------- triton (fused, O(N) memory)

def ntxent_triton(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent with the row logsumexps from fused Triton kernels; the positive term and the mean in torch.

    Shapes as the reference. fp32 input runs TF32 dots on the GPU, bf16/fp16 input runs dots in that type
    (both accumulate in fp32); float64 is refused (the kernels have no fp64 dots)."""
    from . import triton_ntxent

    with _no_autocast(z1.device):
        z = _stack_normalised(z1, z2)                                       # (2N, D), fp32
        half = z1.dtype in (torch.bfloat16, torch.float16)
        lse = triton_ntxent.row_lse(z, temperature, z1.dtype if half else None)   # (2N,) fp32
        return (lse - _positive_logits(z, 1.0 / temperature)).mean()


# --------------------------------------------------------------------------- auto: measured, not assumed

_AUTO: dict = {}
CPU_TILED_FROM = 1024   # pairs; below it the reference is as fast on the CPU (benchmarks/bench_loss.py)


def resolve_impl(z1: Tensor, temperature: float) -> str:
    """The implementation ``impl="auto"`` runs for input shaped like ``z1`` (N, D).

    CPU: a fixed rule, so that CPU runs stay bit-reproducible: ``tiled`` from CPU_TILED_FROM pairs on (its
    tiles stay in cache; benchmarks/bench_loss.py), else ``reference``. CUDA: the
    candidates (``triton`` where Triton is there, ``reference`` where its (2N, 2N) matrices fit in a quarter
    of the free memory, else ``tiled``) are each timed forward + backward on random input of this shape, and
    the fastest is kept for this (device, N rounded up to a power of two, D, dtype)."""
    n, d = z1.shape
    if z1.device.type != "cuda":
        return "tiled" if n >= CPU_TILED_FROM else "reference"
    key = (str(z1.device), 1 << (n - 1).bit_length(), d, z1.dtype)
    if key not in _AUTO:
        _AUTO[key] = _fastest(_cuda_candidates(n, z1), n, d, z1, temperature)
    return _AUTO[key]


def _cuda_candidates(n: int, z1: Tensor) -> list[str]:
    from . import triton_ntxent

    free, _ = torch.cuda.mem_get_info(z1.device)
    dense_bytes = 3 * (2 * n) ** 2 * 4          # logits, softmax and its gradient, fp32
    names = ["triton"] if triton_ntxent.available() else []
    names.append("reference" if dense_bytes < free / 4 else "tiled")
    return names


def _fastest(names: list[str], n: int, d: int, like: Tensor, temperature: float) -> str:
    if len(names) == 1:
        return names[0]
    with torch.enable_grad():      # the loss may be first called under no_grad (an evaluation)
        return _time_each(names, n, d, like, temperature)


def _time_each(names: list[str], n: int, d: int, like: Tensor, temperature: float) -> str:
    z1 = torch.randn(n, d, device=like.device, dtype=like.dtype, requires_grad=True)
    z2 = torch.randn(n, d, device=like.device, dtype=like.dtype, requires_grad=True)
    times = {}
    for name in names:
        fn = _IMPL_FNS[name]
        fn(z1, z2, temperature).backward()                                  # warm-up (and Triton's compile)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn(z1, z2, temperature).backward()
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end)
    return min(times, key=times.get)


# --------------------------------------------------------------------------- distributed gather

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    Every rank computes the same global loss; summing makes rank r's gradient K x dL/dz_r, which
    DistributedDataParallel's gradient *averaging* turns back into exactly the single-process gradient.
    Slicing without the sum (lightly #1528) would leave the gradients K times too small.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank = dist.get_rank()
        return grad[rank * ctx.n:(rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """(n, D) on each of K ranks -> (K n, D), rank-major, identical on every rank. Needs equal n."""
    return _GatherWithGrad.apply(x)


# --------------------------------------------------------------------------- the module

_IMPL_FNS = {"reference": ntxent_reference, "compiled": ntxent_compiled, "tiled": ntxent_tiled,
             "triton": ntxent_triton}


class NTXentLoss(nn.Module):
    """NT-Xent loss of SimCLR.

    Args:
        temperature: softmax temperature t > 0 (SimCLR: 0.5 for small batches, 0.1 for large ones).
        impl: ``"reference"``, ``"compiled"``, ``"tiled"``, ``"triton"`` or ``"auto"`` (see the module docstring).
        gather_distributed: in an initialised ``torch.distributed`` group, gather both views from every
            rank so negatives come from the global batch; each rank returns the global loss.
        tile_size: tile edge for ``impl="tiled"``.
        check_finite: raise ``ValueError`` on NaN/Inf input instead of returning a silent NaN. Costs one
            device-to-host sync per call; the training loop turns it off and checks the loss itself.

    Shape:
        z1, z2: (N, D). Output: scalar.
    """

    def __init__(self, temperature: float = 0.5, impl: str = "reference", gather_distributed: bool = False,
                 tile_size: int = DEFAULT_TILE, check_finite: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.temperature = float(temperature)
        self.impl = impl
        self.gather_distributed = gather_distributed
        self.tile_size = int(tile_size)
        self.check_finite = check_finite

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        validate_pair(z1, z2, self.temperature)
        if self.check_finite and not (torch.isfinite(z1).all() and torch.isfinite(z2).all()):
            raise ValueError("NT-Xent input holds NaN or Inf: the encoder diverged "
                             "(try a lower learning rate, or a higher temperature)")
        if self.gather_distributed and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        impl = resolve_impl(z1, self.temperature) if self.impl == "auto" else self.impl
        if impl == "tiled":
            return ntxent_tiled(z1, z2, self.temperature, self.tile_size)
        return _IMPL_FNS[impl](z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, gather_distributed={self.gather_distributed}"
