"""The measurements behind small choices in the code, each against the alternative it was chosen over (CPU).

Groups: ``views-per-call`` (augment.views_per_call: the fused path per 256 views at 256 and 4,096 views a
call), ``max3x3`` (augment._max3x3 against max_pool2d), ``pool-relu-order`` (model._pool_relu: pool then ReLU
against ReLU then pool, forward + backward), ``blur`` and ``erase`` (fastclr's device-drawn steps against
Kornia's modules), ``adamw`` (fused AdamW, where backend picks it, against the foreach one).
"""
import pytest
import torch
import torch.nn.functional as F

from fastclr.augment import RandomBlur, RandomErase, SimCLRAugment, _max3x3, kornia_modules
from fastclr.config import AugConfig

from .conftest import QUICK, describe, run

VIEWS = 512 if QUICK else 4096


@pytest.mark.parametrize("impl", ["fused", "kornia"])
@pytest.mark.parametrize("per_call", [256, 4096])
def test_views_per_call(benchmark, impl, per_call):
    """4,096 views as 4,096 / per_call calls: the fused path's fixed cost per call against Kornia's chain's
    growing cost per view."""
    if QUICK and per_call > 256:
        pytest.skip("the smoke test runs the small calls only")
    benchmark.group = "views-per-call-cpu"
    describe(benchmark, f"{'fused' if impl == 'fused' else 'Kornia chain'}, {per_call} views a call",
             baseline=(impl, per_call) == ("kornia", 256))
    aug = SimCLRAugment(impl=impl)
    x = torch.rand(VIEWS, 1, 28, 28)
    run(benchmark, lambda: [aug(c) for c in x.split(per_call)], "cpu", rounds=3, warmup=1)
    benchmark.extra_info["images_per_second"] = VIEWS / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", ["separable", "max_pool2d"])
def test_max3x3(benchmark, impl):
    benchmark.group = "max3x3-cpu"
    describe(benchmark, {"separable": "separable 3x3 max (augment._max3x3)",
                         "max_pool2d": "max_pool2d(3, stride 1, padding 1)"}[impl], baseline=impl == "max_pool2d")
    x = torch.rand(512, 1, 28, 28)
    fn = _max3x3 if impl == "separable" else (lambda t: F.max_pool2d(t, 3, stride=1, padding=1))
    run(benchmark, lambda: fn(x), "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = 512 / benchmark.stats.stats.mean


@pytest.mark.parametrize("order", ["pool-relu", "relu-pool"])
def test_pool_relu_order(benchmark, order):
    """(256, 16, 28, 28) bf16 channels_last, forward + backward, ATen layers (no fastclr kernel)."""
    benchmark.group = "pool-relu-order-cpu"
    describe(benchmark, {"pool-relu": "max-pool then ReLU (model._pool_relu)",
                         "relu-pool": "ReLU then max-pool"}[order], baseline=order == "relu-pool")
    n = 16 if QUICK else 256
    x = torch.randn(n, 16, 28, 28).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(n, 16, 14, 14).bfloat16().contiguous(memory_format=torch.channels_last)
    fn = (lambda t: F.relu(F.max_pool2d(t, 2))) if order == "pool-relu" else (lambda t: F.max_pool2d(F.relu(t), 2))
    run(benchmark, lambda: torch.autograd.grad(fn(x), x, g), "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = n / benchmark.stats.stats.mean


@pytest.mark.parametrize("step", ["blur", "erase"])
@pytest.mark.parametrize("impl", ["fastclr", "kornia"])
def test_blur_and_erase(benchmark, step, impl):
    """p 0.5 on 4,096 views: fastclr's step (parameters drawn on the device, whole batch) against Kornia's module
    (host-side draws, the chosen samples only)."""
    benchmark.group = f"{step}-cpu"
    describe(benchmark, f"{impl} {step}", baseline=impl == "kornia")
    cfg = AugConfig(blur_p=0.5, erase_p=0.5)
    mod = ({"blur": RandomBlur(cfg.blur_sigma, 0.5), "erase": RandomErase(cfg.erase_scale, 0.5)}[step]
           if impl == "fastclr" else kornia_modules(cfg)[step])
    x = torch.rand(VIEWS, 1, 28, 28)
    run(benchmark, lambda: mod(x), "cpu", rounds=15, warmup=2)
    benchmark.extra_info["images_per_second"] = VIEWS / benchmark.stats.stats.mean


@pytest.mark.parametrize("fused", [True, False])
def test_adamw(benchmark, fused):
    """One AdamW step over the tutorial network's 11 tensors."""
    from fastclr.model import build_model

    if fused and not _fused_adamw_runs():
        pytest.skip("this torch has no fused AdamW on the CPU")
    benchmark.group = "adamw-cpu"
    describe(benchmark, "fused AdamW" if fused else "foreach AdamW", baseline=not fused)
    params = list(build_model("tutorial", 16, 128, 256, 64, (0.13, 0.31)).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, 1e-3, fused=fused, foreach=None if fused else True)
    run(benchmark, opt.step, "cpu", rounds=50, warmup=5)


def _fused_adamw_runs() -> bool:
    from fastclr.backend import fused_adamw_available

    return fused_adamw_available("cpu")
