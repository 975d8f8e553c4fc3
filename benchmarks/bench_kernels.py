"""fastclr.kernels against the PyTorch layers they replace, forward + backward, bf16 channels_last, CPU."""
import pytest
import torch
import torch.nn.functional as F

from fastclr import kernels

from .conftest import QUICK, describe, run

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="fastclr's CPU kernels cannot be built here")
BATCH = 8 if QUICK else 256          # both views of the tutorial's batch of 128


@needs_kernels
@pytest.mark.parametrize("impl", ["kernel", "aten"])
@pytest.mark.parametrize("c,hw", [(16, 28), (32, 14), (32, 28), (64, 14)])
def test_pool_relu(benchmark, impl, c, hw):
    """2x2 max-pool + ReLU at the encoders' shapes (tutorial: 16@28, 32@14; cnn width 32: 32@28, 64@14)."""
    benchmark.group = f"pool_relu-{c}x{hw}-cpu"
    describe(benchmark, {"kernel": "fastclr kernel", "aten": "ATen"}[impl], baseline=impl == "aten")
    x = torch.randn(BATCH, c, hw, hw).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(BATCH, c, hw // 2, hw // 2).bfloat16().contiguous(memory_format=torch.channels_last)
    fn = kernels.pool_relu if impl == "kernel" else (lambda t: F.relu(F.max_pool2d(t, 2)))
    run(benchmark, lambda: torch.autograd.grad(fn(x), x, g), "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean


@needs_kernels
@pytest.mark.parametrize("impl", ["kernel", "aten"])
def test_first_block(benchmark, impl):
    """The tutorial's first block (normalise, conv 1->16, pool, ReLU) under bf16 autocast, forward + weight
    gradients, as in training."""
    benchmark.group = "first_block-cpu"
    describe(benchmark, {"kernel": "fastclr kernel", "aten": "ATen"}[impl], baseline=impl == "aten")
    conv = torch.nn.Conv2d(1, 16, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.rand(BATCH, 1, 28, 28)
    g = torch.randn(BATCH, 16, 14, 14).bfloat16().contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if impl == "kernel":
                y = kernels.conv3x3_pool_relu(x, conv, 0.1307, 0.3081)
            else:
                y = F.relu(F.max_pool2d(conv((x - 0.1307) / 0.3081), 2))
        return torch.autograd.grad(y, [conv.weight, conv.bias], g)

    run(benchmark, step, "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean
