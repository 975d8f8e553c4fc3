"""Fused NT-Xent on the GPU with Triton: row logsumexps of ``z z^T / t`` without the (M, M) matrix.

The part of NT-Xent that costs O(M^2) is, for each of the M = 2N normalised rows,

    lse_i = logsumexp_{j != i} s_ij,        s_ij = z_i . z_j / t.

:func:`row_lse` computes it flash-attention style (Dao et al. 2022; Inf-CL, Cheng et al. 2024, does the same
for the CLIP loss): one program per block of rows walks the column blocks, computes a (BLOCK_M, BLOCK_N) tile
of ``s`` in registers with a tensor-core dot, and folds it into a running max and sum (online softmax). Only
the (M,) fp32 ``lse`` reaches memory, so the extra memory is O(M), not O(M^2).

The backward recomputes each tile from ``lse``. For an upstream gradient g = dL/dlse (M,),

    dL/dz_k = (1/t) sum_{j != k} (g_k P_kj + g_j P_jk) z_j,     P_kj = exp(s_kj - lse_k),

and since ``s`` is symmetric, P_jk = exp(s_kj - lse_j) comes from the same tile and the column's saved
statistic. So ONE pass over the tiles, one program per block of rows, writes dL/dz with no atomics and no
second kernel (a CLIP loss, whose matrix is not symmetric, needs a row pass and a column pass).

The positive term, the mean and the normalisation stay in torch (fastclr.loss) with autograd.

Precision: tiles accumulate in fp32. fp32 inputs use TF32 tensor-core dots on the GPU (``input_precision
"tf32"``; about 1e-3 relative, the tolerance tests/test_loss.py uses on CUDA) and exact fp32 under Triton's
interpreter; bf16 / fp16 inputs use bf16 / fp16 dots (2e-2). Rows are stored (M, D) contiguous.

Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported) runs these kernels on CPU
tensors; that is how the tests run without a GPU. It runs no bf16, so those tests use fp32.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:                              # pragma: no cover - torch wheels without Triton
    triton = None

MIN_TRITON = (3, 6)     # tested: 3.6 (the GPU image's) and 3.8; 3.1's interpreter rejects the nested constexprs
MAX_DIM = 4096          # beyond this a row block's tiles stop paying for their registers; a clear error
LOG2E = 1.4426950408889634


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Triton's interpreter was on when the kernels were defined (it is read at decoration time) and can run
    them: before Triton 3.8 it passes scalar arguments as 1-element arrays, which NumPy >= 2.3 will not turn
    into a loop bound (checked with Triton 3.6: NumPy 2.2 runs the tests, 2.4 does not)."""
    if not _interpret_env() or triton is None:
        return False
    import numpy

    numpy_version = tuple(int(p) for p in numpy.__version__.split(".")[:2])
    return _version() >= (3, 8) or numpy_version < (2, 3)


def _version() -> tuple[int, ...]:
    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def available() -> bool:
    """Triton is importable and new enough for these kernels."""
    return triton is not None and _version() >= MIN_TRITON


def cannot_run_on(device_type: str) -> str | None:
    """Why the kernels cannot run on tensors of ``device_type`` here, or None where they can."""
    if not available():
        found = "none is installed" if triton is None else f"found {triton.__version__}"
        return (f"NT-Xent impl='triton' needs Triton >= {'.'.join(map(str, MIN_TRITON))} ({found}); "
                "upgrade torch/triton, or use impl='tiled' for the same O(N) memory")
    if device_type == "cpu" and not interpreting():
        return ("NT-Xent impl='triton' runs on CUDA tensors; on CPU tensors only under Triton's interpreter "
                "(TRITON_INTERPRET=1 set before fastclr is imported, for tests; Triton >= 3.8, or NumPy < 2.3). "
                "On the CPU use impl='tiled' or 'reference'")
    return None


def check_inputs(z: Tensor, dtype: torch.dtype) -> None:
    """Raise a clear error for input the kernels do not take (ValueError) or cannot run on (RuntimeError);
    ``dtype``: the dots' input type."""
    reason = cannot_run_on(z.device.type)
    if reason:
        raise RuntimeError(reason)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NT-Xent impl='triton' takes float32, bfloat16 or float16 input, got {dtype}; "
                         "use impl='reference' for float64")
    if z.shape[1] > MAX_DIM:
        raise ValueError(f"NT-Xent impl='triton' supports feature sizes up to {MAX_DIM}, got D={z.shape[1]}; "
                         "use impl='tiled'")


if triton is not None:

    @triton.jit
    def _load_rows(Z, idx, d0, M, D, stride, BLOCK_D: tl.constexpr):
        """z[idx, d0:d0 + BLOCK_D] as a (len(idx), BLOCK_D) tile; zeros past M rows and D features."""
        ds = d0 + tl.arange(0, BLOCK_D)
        return tl.load(Z + idx[:, None] * stride + ds[None, :], mask=(idx[:, None] < M) & (ds[None, :] < D),
                       other=0.0)

    @triton.jit
    def _dots(Z, rows, cols, M, D, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
        """z[rows] . z[cols]^T (BLOCK_M, BLOCK_N) in fp32, summed over feature chunks of BLOCK_D."""
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            a = _load_rows(Z, rows, d0, M, D, stride, BLOCK_D)
            b = _load_rows(Z, cols, d0, M, D, stride, BLOCK_D)
            s += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        return s

    @triton.jit
    def _lse_fwd_kernel(Z, LSE, M, D, stride, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
        """LSE[i] = logsumexp_{j != i} (z_i . z_j) / t for one block of rows; ``scale`` = log2(e) / t."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        if ONE_CHUNK:   # all D features in one chunk: the row block stays in registers for the column walk
            a = _load_rows(Z, rows, 0, M, D, stride, BLOCK_D)
        # running max in log2 units; a finite start so that exp2(m_old - m_new) is never exp2(-inf + inf)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            if ONE_CHUNK:
                s = tl.dot(a, tl.trans(_load_rows(Z, cols, 0, M, D, stride, BLOCK_D)), input_precision=PRECISION)
            else:
                s = _dots(Z, rows, cols, M, D, stride, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            keep = (rows[:, None] != cols[None, :]) & (cols[None, :] < M)
            s = tl.where(keep, s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(LSE + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rows < M)

    @triton.jit
    def _lse_bwd_kernel(Z, LSE, G, DZ, M, D, stride, scale, inv_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                        W_FP32: tl.constexpr, W_PRECISION: tl.constexpr):
        """DZ[rows, dout] = inv_t sum_j (g_i P_ij + g_j P_ji) z_j for one block of rows and one chunk of output
        features (all of them when ONE_CHUNK). P_ij = exp2(s_ij scale' - lse_i log2e)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d0 = tl.program_id(1) * BLOCK_D             # this program's chunk of output features
        if ONE_CHUNK:
            a = _load_rows(Z, rows, 0, M, D, stride, BLOCK_D)
        row_ok = rows < M
        lse_i = tl.load(LSE + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        g_i = tl.load(G + rows, mask=row_ok, other=0.0)
        dout = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, M, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < M
            b = _load_rows(Z, cols, d0, M, D, stride, BLOCK_D)     # z[cols], this chunk: (BLOCK_N, BLOCK_D)
            if ONE_CHUNK:
                s = tl.dot(a, tl.trans(b), input_precision=PRECISION)
            else:
                s = _dots(Z, rows, cols, M, D, stride, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            s = s * scale
            lse_j = tl.load(LSE + cols, mask=col_ok, other=0.0) * 1.4426950408889634
            g_j = tl.load(G + cols, mask=col_ok, other=0.0)
            # both softmax entries from one tile: P_ij (row i's statistic) and P_ji (column j's); each <= 1
            w = g_i[:, None] * tl.exp2(s - lse_i[:, None]) + g_j[None, :] * tl.exp2(s - lse_j[None, :])
            keep = (rows[:, None] != cols[None, :]) & col_ok[None, :] & row_ok[:, None]
            w = tl.where(keep, w, 0.0)
            if W_FP32:   # fp16 input: w ~ g P ~ 1/M^2 underflows fp16 (not bf16, which has fp32's range)
                acc += tl.dot(w, b.to(tl.float32), input_precision=W_PRECISION)
            else:
                acc += tl.dot(w.to(b.dtype), b, input_precision=PRECISION)
        tl.store(DZ + rows[:, None] * stride + dout[None, :], acc * inv_t,
                 mask=row_ok[:, None] & (dout[None, :] < D))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_config(m: int, d: int, dtype: torch.dtype, on_gpu: bool, sm_count: int = 132) -> dict:
    """Kernel parameters for M rows of D features whose dots take ``dtype``.

    On the GPU: 64 x 64 tiles (32-row blocks when 64-row ones would leave SMs idle), the whole feature size
    in one chunk up to D = 128 (the row block then stays in registers), else chunks of 64; 8 warps. ptxas
    reports no register spills for these on sm_90 (tests/test_triton_ntxent.py compiles them).
    Under the interpreter: 16 x 16 tiles and chunks of 16, so that small tests cross several blocks.

    Dot precisions: TF32 for fp32 on the GPU, exact ("ieee") under the interpreter; bf16 / fp16 dots take
    their own type. For fp16 the backward's w = g P (~1/M^2) would underflow, so that dot runs in fp32."""
    if on_gpu:
        block_m = 32 if triton.cdiv(m, 64) < sm_count else 64
        block_n, max_d, chunk, warps, stages = 64, 128, 64, 8, 2
    else:
        block_m = block_n = max_d = chunk = 16
        warps = stages = 1
    block_d = max(16, triton.next_power_of_2(d))
    one_chunk = block_d <= max_d
    fp32 = "tf32" if on_gpu else "ieee"
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d if one_chunk else chunk, ONE_CHUNK=one_chunk,
                PRECISION=fp32 if dtype == torch.float32 else "ieee", W_FP32=dtype == torch.float16,
                W_PRECISION=fp32, num_warps=warps, num_stages=stages)


def _config_for(rows: Tensor) -> dict:
    on_gpu = rows.device.type == "cuda"
    return launch_config(*rows.shape, rows.dtype, on_gpu, _sm_count(rows.device.index or 0) if on_gpu else 0)


BWD_ONLY = ("W_FP32", "W_PRECISION")   # the backward kernel's extra parameters


class _RowLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, inv_t: float, dtype: torch.dtype) -> Tensor:
        rows = z.to(dtype).contiguous()          # the dots' input; the gradient goes back in z's own dtype
        m, d = rows.shape
        cfg = _config_for(rows)
        fwd = {k: v for k, v in cfg.items() if k not in BWD_ONLY}
        lse = torch.empty(m, dtype=torch.float32, device=z.device)
        _lse_fwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](rows, lse, m, d, rows.stride(0), inv_t * LOG2E, **fwd)
        ctx.save_for_backward(rows, lse)
        ctx.inv_t, ctx.cfg = inv_t, cfg
        return lse

    @staticmethod
    def backward(ctx, grad_lse: Tensor):
        rows, lse = ctx.saved_tensors
        cfg, (m, d) = ctx.cfg, rows.shape
        # fp32 out, whatever the dots' type: dL/dz ~ 1/(M t) would lose its small entries in fp16
        dz = torch.empty(m, d, dtype=torch.float32, device=rows.device)
        chunks = 1 if cfg["ONE_CHUNK"] else triton.cdiv(d, cfg["BLOCK_D"])
        # the kernel writes DZ with Z's row stride: both contiguous (M, D)
        _lse_bwd_kernel[(triton.cdiv(m, cfg["BLOCK_M"]), chunks)](
            rows, lse, grad_lse.float().contiguous(), dz, m, d, rows.stride(0), ctx.inv_t * LOG2E, ctx.inv_t, **cfg)
        return dz, None, None


def row_lse(z: Tensor, temperature: float, dtype: torch.dtype | None = None) -> Tensor:
    """logsumexp over j != i of z_i . z_j / t, with autograd.

    Args:
        z: (M, D) normalised rows (CUDA; CPU tensors under the interpreter).
        dtype: the dots' input type, float32 (default: z's), bfloat16 or float16; the gradient comes back
            in z's dtype, computed in fp32.

    Shape:
        Output: (M,) float32.
    """
    dtype = dtype or z.dtype
    check_inputs(z, dtype)
    if not math.isfinite(1.0 / temperature):
        raise ValueError(f"temperature {temperature} is too small")
    return _RowLSE.apply(z, 1.0 / temperature, dtype)


# --------------------------------------------------------------------------- the GPU build, without a GPU

def build_report(dtype: torch.dtype, d: int, m: int = 32768, arch: int = 90, sm_count: int = 132) -> list[dict]:
    """Compile both kernels as launch_config sets them for (M, D, dtype) on an sm_``arch`` GPU, with Triton's
    bundled ptxas and no GPU; returns per kernel the registers, spill bytes, shared memory and whether the
    dots became Hopper tensor-core (wgmma) instructions."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = launch_config(m, d, dtype, on_gpu=True, sm_count=sm_count)
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    shapes = {"M": "i32", "D": "i32", "stride": "i32", "scale": "fp32"}
    kernels = [("forward", _lse_fwd_kernel, {"Z": ptr, "LSE": "*fp32", **shapes}, BWD_ONLY),
               ("backward", _lse_bwd_kernel, {"Z": ptr, "LSE": "*fp32", "G": "*fp32", "DZ": "*fp32", **shapes,
                                             "inv_t": "fp32"}, ())]
    rows = []
    for name, kernel, sig, leave_out in kernels:
        consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", *leave_out)}
        src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(compiled.asm["ptx"])
            f.flush()
            out = subprocess.run([_ptxas(), "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, check=True)
        report = out.stderr + out.stdout
        rows.append(dict(kernel=name, dtype=str(dtype).removeprefix("torch."), d=d, m=m,
                         block_m=cfg["BLOCK_M"], block_n=cfg["BLOCK_N"], block_d=cfg["BLOCK_D"],
                         registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                         spill_bytes=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
                         shared_bytes=compiled.metadata.shared, wgmma="wgmma" in compiled.asm["ptx"]))
    return rows


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def main(argv=None) -> int:
    """``python -m fastclr.triton_ntxent [--json]``: the sm_90 build report of the configurations an H200 runs."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m fastclr.triton_ntxent", description=main.__doc__)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    if not available() or _interpret_env() or not os.path.exists(_ptxas()):
        print("needs Triton with its bundled ptxas, and TRITON_INTERPRET unset", file=sys.stderr)
        return 3
    rows = [r for dtype, d in ((torch.float32, 128), (torch.bfloat16, 128), (torch.float16, 128),
                               (torch.float32, 1024)) for r in build_report(dtype, d)]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(" ".join(f"{k}={v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
