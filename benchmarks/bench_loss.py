"""NT-Xent fwd+bwd per implementation and batch size (D=128, fp32 inputs), with lightly's loss as a peer row
when installed, and the peak memory each case adds.

One table per (device, N): ``pytest benchmarks/bench_loss.py --benchmark-group-by=group``. CPU: N = 256 to
16,384 (dense implementations up to 4,096). CUDA: N = 2,048, 16,384, 65,536 and 262,144; a dense
implementation runs where its (2N, 2N) matrices fit in the free GPU memory (not at 65,536 on a 141 GB H200),
and 262,144 (a 1 TiB matrix) is for the O(N)-memory ``tiled`` and ``triton`` only.

On CUDA the ``triton`` kernels use TF32 dots for fp32 input (fastclr.triton_ntxent); the dense
implementations use PyTorch's default fp32 matmul.
"""
import importlib.util

import pytest
import torch

from fastclr.loss import NTXentLoss

from .conftest import QUICK, cpu_peak_mib, describe, run, skip_unless_device

D = 128
SIZES = {"cpu": [256] if QUICK else [256, 1024, 2048, 4096, 16384],
         "cuda": [2048] if QUICK else [2048, 16384, 65536, 262144]}
IMPLS = ["reference", "compiled", "tiled", "triton", "lightly"]
LINEAR_MEMORY = ("tiled", "triton")            # never hold the (2N, 2N) matrix
HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None
CASES = [(impl, n, device) for device in ["cpu", "cuda"] for n in SIZES[device] for impl in IMPLS]


def make_loss(impl):
    if impl == "lightly":
        from lightly.loss import NTXentLoss as LightlyNTXent

        return LightlyNTXent(temperature=0.5)
    return NTXentLoss(0.5, impl=impl, check_finite=False)


def skip_reason(impl: str, n: int, device: str) -> str | None:
    if impl == "lightly" and not HAS_LIGHTLY:
        return "lightly is not installed (optional peer: pip install lightly)"
    if impl == "triton" and device == "cpu":
        return "the Triton kernels run on CUDA (on CPU tensors only in Triton's interpreter, which is no benchmark)"
    if impl in LINEAR_MEMORY:
        return None
    if device == "cpu" and n > 4096:
        return "dense 32768^2 matrices: only the tiled loss is run at this size on CPU"
    if device == "cuda":
        need = 3 * (2 * n) ** 2 * 4                    # logits, softmax, its gradient: fp32 (2N, 2N) each
        if need > torch.cuda.mem_get_info()[0]:
            return f"dense: needs ~{need / 2**30:,.0f} GiB of GPU memory for (2N, 2N) matrices"
    return None


@pytest.mark.parametrize("impl,n,device", CASES, ids=[f"{i}-{n}-{d}" for i, n, d in CASES])
def test_loss_fwd_bwd(benchmark, impl, n, device):
    skip_unless_device(device)
    reason = skip_reason(impl, n, device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"loss-{device}-N{n}"
    describe(benchmark, {"reference": "reference (autograd)", "compiled": "compiled (torch.compile)",
                         "tiled": "tiled", "triton": "triton kernels", "lightly": "lightly NTXentLoss"}[impl],
             baseline=impl == "reference")
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, D, device=device, generator=g, requires_grad=True)
    z2 = torch.randn(n, D, device=device, generator=g, requires_grad=True)
    loss_fn = make_loss(impl)

    def step():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).backward()

    big = n >= 16384
    if not (big and impl == "tiled"):   # compile / autotune / allocate outside the timings (tiled has none)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    run(benchmark, step, device, rounds=1 if big else 5, warmup=0 if big else 1)
    benchmark.extra_info["pairs_per_second"] = n / benchmark.stats.stats.mean
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    elif n >= 2048 and not QUICK:
        setup = (f"from benchmarks.bench_loss import make_loss; z1 = torch.randn({n}, {D}, requires_grad=True); "
                 f"z2 = torch.randn({n}, {D}, requires_grad=True); f = make_loss({impl!r})")
        benchmark.extra_info["peak_mib"] = cpu_peak_mib(setup, "f(z1, z2).backward()")
