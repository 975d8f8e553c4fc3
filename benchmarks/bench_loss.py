"""NT-Xent fwd+bwd per implementation and batch size (D=128), with lightly's loss as a peer row when installed.

One table per (device, N): ``pytest benchmarks/bench_loss.py --benchmark-group-by=group``."""
import importlib.util

import pytest
import torch

from fastclr.loss import NTXentLoss

from .conftest import DEVICES, QUICK, cpu_peak_mib, cuda_peak_mib, run, skip_unless_device

D = 128
SIZES = [256] if QUICK else [256, 1024, 2048, 4096, 16384]
IMPLS = ["reference", "compiled", "tiled", "lightly"]
HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None


def make_loss(impl):
    if impl == "lightly":
        from lightly.loss import NTXentLoss as LightlyNTXent

        return LightlyNTXent(temperature=0.5)
    return NTXentLoss(0.5, impl=impl, check_finite=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_loss_fwd_bwd(benchmark, impl, n, device):
    skip_unless_device(device)
    if impl == "lightly" and not HAS_LIGHTLY:
        pytest.skip("lightly is not installed (optional peer: pip install lightly)")
    if n > 4096 and impl != "tiled" and device == "cpu":
        pytest.skip("dense 32768^2 matrices: only the tiled loss is run at this size on CPU")
    benchmark.group = f"loss-{device}-N{n}"
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, D, device=device, generator=g, requires_grad=True)
    z2 = torch.randn(n, D, device=device, generator=g, requires_grad=True)
    loss_fn = make_loss(impl)

    def step():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).backward()

    step()  # compile / allocate outside the timings
    big = n >= 16384
    run(benchmark, step, device, rounds=1 if big else 5, warmup=0 if big else 1)
    benchmark.extra_info["pairs_per_second"] = n / benchmark.stats.stats.mean
    if device == "cuda":
        benchmark.extra_info["peak_mib"] = cuda_peak_mib(step)
    elif n >= 2048 and not QUICK:
        setup = (f"from benchmarks.bench_loss import make_loss; z1 = torch.randn({n}, {D}, requires_grad=True); "
                 f"z2 = torch.randn({n}, {D}, requires_grad=True); f = make_loss({impl!r})")
        benchmark.extra_info["peak_mib"] = cpu_peak_mib(setup, "f(z1, z2).backward()")
