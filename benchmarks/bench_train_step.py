"""One SimCLR training step (both views, fwd+bwd+AdamW) per encoder, batch and precision; and a full epoch."""
import dataclasses

import pytest
import torch

from fastclr.augment import SimCLRAugment
from fastclr.backend import make_runtime, resolve_amp_dtype
from fastclr.config import TrainConfig
from fastclr.train import build_training

from .conftest import DEVICES, QUICK, describe, run, skip_unless_device


def setup(arch, width, batch, device, amp=False, compile=False, channels_last=True, batches=None, cpu_kernels=True,
          cuda_graph=False):
    """A zero-argument training step built as ``fastclr.train`` builds it; ``batches`` (an iterator of view
    pairs) feeds it, else one fixed batch augmented afresh each call. ``cpu_kernels=False`` turns
    fastclr.kernels off (they are on wherever the backend can build them); ``cuda_graph``: the step is
    captured (after 3 eager warm-up steps) and replayed, as ``--cuda-graph`` does."""
    rt = make_runtime(device, amp=amp, compile=compile)
    if not cpu_kernels:
        rt = dataclasses.replace(rt, cpu_kernels=False)
    cfg = TrainConfig(arch=arch, width=width, batch_size=batch, channels_last=channels_last, lr=1e-3,
                      cuda_graph=cuda_graph)
    tr = build_training(cfg, rt, total_steps=10**6)
    if batches is not None:
        return lambda: tr.step(*next(batches))
    aug = SimCLRAugment(cfg.augment, cpu_kernels=rt.cpu_kernels)
    x = torch.rand(batch, 1, 28, 28, device=rt.device)
    return lambda: tr.step(*aug(torch.cat([x, x])).chunk(2))


# (arch, width, batch pairs, amp, kernels): the tutorial's network at its batch size in fp32 and with AMP
# (with and without fastclr.kernels), and the cnn
CASES = [("tutorial", 16, 128, False, True), ("tutorial", 16, 128, True, True), ("tutorial", 16, 128, True, False),
         ("cnn", 16, 256, False, True), ("cnn", 32, 128, False, True), ("cnn", 32, 128, True, True),
         ("cnn", 32, 128, True, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,width,batch,amp,kernels", CASES[:1] if QUICK else CASES)
def test_train_step(benchmark, arch, width, batch, amp, kernels, device):
    skip_unless_device(device)
    if amp and resolve_amp_dtype(True, torch.device(device))[0] is None:
        pytest.skip("AMP resolves to fp32 here: this CPU has no native bf16 (see fastclr.backend)")
    if not kernels and device != "cpu":
        pytest.skip("fastclr.kernels are CPU-only: nothing to turn off")
    benchmark.group = f"train_step-{device}"
    net = "tutorial net" if arch == "tutorial" else f"cnn w{width}"
    describe(benchmark, f"{net}, b{batch}, {'amp' if amp else 'fp32'}" + ("" if kernels else ", no CPU kernels"),
             baseline=(arch, amp) == ("tutorial", False))
    step = setup(arch, width, batch, device, amp, cpu_kernels=kernels)
    run(benchmark, step, device, rounds=10, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("batch", [128, 1024])
def test_train_step_cuda_graph(benchmark, batch):
    """The default cnn with bf16 autocast, the step captured as a CUDA graph (--cuda-graph), beside the eager
    rows of the same group."""
    skip_unless_device("cuda")
    benchmark.group = "train_step-cuda"
    describe(benchmark, f"cnn w32, b{batch}, amp, CUDA graph")
    step = setup("cnn", 32, batch, "cuda", amp=True, cuda_graph=True)
    run(benchmark, step, "cuda", rounds=20, warmup=5)
    benchmark.extra_info["images_per_second"] = 2 * batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_compiled(benchmark, device):
    skip_unless_device(device)
    if QUICK:
        pytest.skip("compilation takes a minute")
    benchmark.group = f"train_step-{device}"
    describe(benchmark, "cnn w16, b256, compiled")
    step = setup("cnn", 16, 256, device, amp=device == "cuda", compile=True)
    run(benchmark, step, device, rounds=10, warmup=3)
    benchmark.extra_info["images_per_second"] = 2 * 256 / benchmark.stats.stats.mean


EPOCH_CASES = [(128, False), (128, True), (1024, True)]    # (batch pairs, --cuda-graph); graphs on CUDA only


@pytest.mark.parametrize("batch,graph", EPOCH_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_epoch(benchmark, device, batch, graph):
    """A full training epoch on 60,000 images (synthetic pixels): device-resident loader, fused views,
    the step; the default configuration (fastclr.config.TrainConfig, AMP as the backend resolves it), and on
    CUDA the captured step at the default batch and at 1,024 pairs."""
    from fastclr.data import DevicePairs

    skip_unless_device(device)
    if (batch, graph) != (128, False) and device != "cuda":
        pytest.skip("CUDA graphs: CUDA only")
    benchmark.group = f"epoch-{device}"
    describe(benchmark, "default epoch" if not graph else f"epoch, b{batch}, CUDA graph", baseline=not graph)
    cfg = TrainConfig(batch_size=batch)
    n = 1024 if QUICK else 60000
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    rt = make_runtime(device, amp=cfg.amp)
    pairs = DevicePairs(images, cfg.batch_size, torch.device(device),
                        SimCLRAugment(cfg.augment, cpu_kernels=rt.cpu_kernels), seed=0)
    steps = len(pairs)

    def epoch():
        it = iter(pairs)
        step = setup(cfg.arch, cfg.width, cfg.batch_size, device, amp=cfg.amp, batches=it, cuda_graph=graph)
        for _ in range(steps):
            step()

    run(benchmark, epoch, device, rounds=1, warmup=0)
    benchmark.extra_info["images_per_second"] = 2 * cfg.batch_size * steps / benchmark.stats.stats.mean


@pytest.mark.parametrize("kernels", [True, False])
def test_train_step_colour(benchmark, kernels):
    """The custom-color recipe's step on 3 x 32 x 32 (cnn width 32, 512-d, batch 128, bf16 where the CPU has it),
    with fastclr.kernels (the fused BatchNorm, pool and ReLU, the input normalisation) and with PyTorch's layers:
    the step compare_lightly's two sides run."""
    from fastclr.sources import ImageData

    benchmark.group = "train_step-colour-cpu"
    describe(benchmark, "cnn w32, 3x32x32, b128, amp" + ("" if kernels else ", no CPU kernels"), baseline=not kernels)
    rt = make_runtime("cpu", amp=True)
    rt = rt if kernels else dataclasses.replace(rt, cpu_kernels=False)
    cfg = TrainConfig.from_recipe("custom-color", dataset="colour", batch_size=8 if QUICK else 128)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    data = ImageData(x, None, None, None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tr = build_training(cfg, rt, total_steps=10**6, data=data)
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.rand(cfg.batch_size, 3, 32, 32, generator=g) for _ in range(2))
    run(benchmark, lambda: tr.step(v1, v2), "cpu", rounds=20, warmup=3)
    benchmark.extra_info["images_per_second"] = 2 * cfg.batch_size / benchmark.stats.stats.mean
