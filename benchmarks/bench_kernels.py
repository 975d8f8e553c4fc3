"""fastclr.kernels against the PyTorch layers they replace, forward + backward, CPU: bf16 channels_last, and bn_act
and the conv weight gradient in f32 too (the step's dtype on CPUs without native bf16)."""
import pytest
import torch
import torch.nn.functional as F

from fastclr import kernels

from .conftest import QUICK, describe, run

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="fastclr's CPU kernels cannot be built here")
BATCH = 8 if QUICK else 256          # both views of the tutorial's batch of 128
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


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


BN_MODES = {"maxpool": kernels.BN_MAXPOOL_RELU, "avgpool": kernels.BN_RELU_AVGPOOL, "relu": kernels.BN_RELU}


@needs_kernels
@pytest.mark.parametrize("impl", ["kernel", "aten"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("c,hw,pool", [(32, 32, "maxpool"), (64, 16, "maxpool"), (128, 8, "avgpool"), (128, 7, "relu")])
def test_bn_act(benchmark, impl, dtype, c, hw, pool):
    """Training-mode BatchNorm2d with what follows it in the cnn (width 32): BN -> max-pool -> ReLU at stages 1 and 2
    (32@32, 64@16 on 32 px colour), BN -> ReLU -> average pool at stage 3 (128@8), BN -> ReLU at 28 px (128@7);
    forward + backward to the input, weight and bias. ATen's side is BatchNorm2d and the layers (its pool + ReLU
    through ATen too). bf16 is the step's dtype on CPUs with native bf16, f32 on the others (fastclr.backend)."""
    benchmark.group = f"bn_act-{pool}-{c}x{hw}-{dtype}-cpu"
    describe(benchmark, {"kernel": "fastclr kernel", "aten": "ATen"}[impl], baseline=impl == "aten")
    x = torch.randn(BATCH, c, hw, hw).to(DTYPES[dtype]).contiguous(memory_format=torch.channels_last).requires_grad_()
    bn = torch.nn.BatchNorm2d(c)
    mode = BN_MODES[pool]
    post = {"maxpool": lambda z: F.relu(F.max_pool2d(z, 2)), "avgpool": lambda z: F.avg_pool2d(F.relu(z), 2),
            "relu": F.relu}[pool]
    fn = (lambda t: kernels.bn_act(t, bn, mode)) if impl == "kernel" else (lambda t: post(bn(t)))
    g = torch.randn(fn(x).shape).to(x.dtype).contiguous(memory_format=torch.channels_last)
    run(benchmark, lambda: torch.autograd.grad(fn(x), [x, bn.weight, bn.bias], g), "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean


needs_bf16_dot = pytest.mark.skipif(not kernels.available() or not kernels.has_bf16_dot(),
                                    reason="the stem and conv3x3 kernels run on AVX512-BF16 only")


@needs_bf16_dot
@pytest.mark.parametrize("impl", ["kernel", "kernel-conv", "aten"])
@pytest.mark.parametrize("cin,hw", [(3, 32), (1, 28)])
def test_stem(benchmark, impl, cin, hw):
    """The cnn's first stage (width 32) on the normalised bf16 views: conv 3x3 -> 32, training BatchNorm, max-pool,
    ReLU, forward + backward to the conv weight and BN's weight and bias. "kernel": fastclr.kernels.stem;
    "kernel-conv": ATen's conv and fastclr's bn_act (what ran before the stem); "aten": the layers under autocast."""
    benchmark.group = f"stem-{cin}x{hw}-cpu"
    describe(benchmark, {"kernel": "fastclr stem", "kernel-conv": "ATen conv + fastclr bn_act",
                         "aten": "ATen"}[impl], baseline=impl == "aten")
    conv, bn = torch.nn.Conv2d(cin, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32)
    x = torch.randn(BATCH, cin, hw, hw).bfloat16().contiguous(memory_format=torch.channels_last)
    g = torch.randn(BATCH, 32, hw // 2, hw // 2).bfloat16().contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if impl == "kernel":
                y = kernels.stem(x, conv, bn)
            elif impl == "kernel-conv":
                y = kernels.bn_act(conv(x), bn, kernels.BN_MAXPOOL_RELU)
            else:
                y = F.relu(F.max_pool2d(bn(conv(x)), 2))
        return torch.autograd.grad(y, [conv.weight, bn.weight, bn.bias], g)

    run(benchmark, step, "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean


@needs_kernels
@pytest.mark.parametrize("impl", ["kernel", "winograd", "aten"])
@pytest.mark.parametrize("ci,co,hw", [(32, 64, 16), (64, 128, 8), (64, 128, 7)])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_conv3x3_wgrad(benchmark, impl, ci, co, hw, dtype):
    """A 3x3 conv's weight gradient at the cnn's stages 2 and 3 (width 32; 7 px: MNIST's stage 3), channels_last:
    fastclr's kernels (the direct sum; in f32 also Winograd's F(2x2, 3x3)) against ATen's convolution_backward asked
    for the weight's alone. bf16 (training under autocast) where the CPU has AVX512-BF16; f32 (training on CPUs
    without native bf16) everywhere."""
    if dtype == "bf16" and not kernels.has_bf16_dot():
        pytest.skip("the bf16 kernel is fast only with AVX512-BF16 dot products")
    if dtype == "bf16" and impl == "winograd":
        pytest.skip("the Winograd kernels are f32")
    benchmark.group = f"conv3x3_wgrad-{'f32-' if dtype == 'f32' else ''}{ci}to{co}x{hw}-cpu"
    describe(benchmark, {"kernel": "fastclr kernel", "winograd": "fastclr Winograd", "aten": "ATen"}[impl],
             baseline=impl == "aten")
    t = DTYPES[dtype]
    x = torch.randn(BATCH, ci, hw, hw).to(t).contiguous(memory_format=torch.channels_last)
    g = torch.randn(BATCH, co, hw, hw).to(t).contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci, 3, 3).to(t)
    if impl != "aten":
        fn = lambda: torch.ops.fastclr.conv3x3_wgrad(g, x, impl == "winograd")                  # noqa: E731
    else:
        fn = lambda: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False,  # noqa: E731
                                                         [0, 0], 1, [False, True, False])
    run(benchmark, fn, "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean


@needs_kernels
@pytest.mark.parametrize("impl", ["winograd", "aten"])
@pytest.mark.parametrize("ci,co,hw", [(32, 64, 16), (64, 128, 8), (64, 128, 7)])
def test_conv3x3_winograd(benchmark, impl, ci, co, hw):
    """A 3x3 conv's forward and input gradient in f32 at the cnn's stages 2 and 3 (width 32; 7 px: MNIST's stage 3),
    channels_last: fastclr's Winograd F(2x2, 3x3) (the input gradient: the same conv of the output gradient with
    the filters flipped and transposed) against ATen's conv2d and convolution_backward asked for the input's."""
    benchmark.group = f"conv3x3_winograd-f32-{ci}to{co}x{hw}-cpu"
    describe(benchmark, {"winograd": "fastclr Winograd", "aten": "ATen"}[impl], baseline=impl == "aten")
    x = torch.randn(BATCH, ci, hw, hw).contiguous(memory_format=torch.channels_last)
    g = torch.randn(BATCH, co, hw, hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(co, ci, 3, 3)
    wt = w.flip(2, 3).transpose(0, 1)
    if impl == "winograd":
        fn = lambda: (torch.ops.fastclr.conv3x3(x, w, True), torch.ops.fastclr.conv3x3(g, wt, True))  # noqa: E731
    else:
        fn = lambda: (F.conv2d(x, w, padding=1),                                                     # noqa: E731
                      torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                          [True, False, False]))
    run(benchmark, fn, "cpu", rounds=30, warmup=3)
    benchmark.extra_info["images_per_second"] = BATCH / benchmark.stats.stats.mean
