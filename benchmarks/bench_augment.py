"""Augmentation throughput (batch 512 of 28x28) and a full epoch of data delivery per loader (no model)."""
import pytest
import torch

from fastclr import kernels
from fastclr.augment import RandomThickness, SimCLRAugment, kornia_modules
from fastclr.config import AugConfig
from fastclr.data import DevicePairs, TorchvisionPairs, torchvision_transform
from fastclr.warp import FusedWarp

from .conftest import DEVICES, QUICK, describe, run, skip_unless_device

BATCH = 512
EPOCH_IMAGES = 2048 if QUICK else 60000


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


AUG_IMPLS = {"fused": "fused warp, device sampler", "fused-kornia-sampler": "fused warp, Kornia's samplers",
             "fused-cpu-kernels": "fused warp, CPU kernels", "kornia": "Kornia chain"}


def augment(impl: str):
    """The default augmentation (AugConfig()) as ``impl`` draws and applies it."""
    if impl == "fused-kornia-sampler":
        return fused_with_kornias_samplers(AugConfig())
    return SimCLRAugment(impl="kornia" if impl == "kornia" else "fused", cpu_kernels=impl.endswith("kernels"))


def fused_with_kornias_samplers(cfg: AugConfig):
    """SimCLRAugment's fused path with the crop and affine parameters drawn by Kornia's own samplers (on the CPU,
    host-side) instead of fastclr.sampling's: what drawing on the device saves."""
    mods, warp, thickness = kornia_modules(cfg), FusedWarp(cfg), RandomThickness(cfg.thickness_p)

    def aug(x):
        params = warp.draw(x.shape, x.device)       # elastic coefficients (drawn on the device either way)
        params.update({k: mods[k].forward_parameters(x.shape) for k in ("crop", "affine")})
        return warp(thickness(x), params).clamp_(0, 1)

    return aug


def tutorial_batch_augment(x):
    """The tutorial's augmentation: one crop and one rotation for the whole batch."""
    from torchvision import transforms

    return transforms.RandomResizedCrop(28, scale=(0.8, 1.0))(x), transforms.RandomRotation(10)(x)


def time_views(benchmark, device, impl, batch, group):
    skip_unless_device(device)
    if impl == "fused-cpu-kernels" and (device != "cpu" or not kernels.available()):
        pytest.skip("fastclr's CPU kernels: CPU only, and they must build here")
    benchmark.group = group
    describe(benchmark, AUG_IMPLS[impl], baseline=impl == "kornia")
    x = images(batch).to(device).float().div_(255)
    aug = augment(impl)
    run(benchmark, lambda: aug(torch.cat([x, x])), device, rounds=20, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", list(AUG_IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_augment_per_sample(benchmark, device, impl):
    """SimCLRAugment on both views in one call: fused (one grid_sample; parameters drawn on the device, or by
    Kornia's samplers; with fastclr.kernels on CPU) against Kornia's chain of modules."""
    time_views(benchmark, device, impl, BATCH, f"augment-b512-{device}")


@pytest.mark.parametrize("impl", ["fused", "fused-kornia-sampler", "kornia"])
def test_augment_2x2048_views_cuda(benchmark, impl):
    """2 x 2,048 views per call on CUDA, the size the device loader augments at once (#12's target row)."""
    time_views(benchmark, "cuda", impl, 2048, "augment-2x2048-cuda")


def test_augment_torchvision_v2_dataloader_2_workers(benchmark):
    """Per-sample CPU transforms in 2 worker processes: time for 10 batches of view pairs."""
    benchmark.group = "augment-b512-cpu"
    describe(benchmark, "torchvision DataLoader, 2 workers")
    pairs = TorchvisionPairs(images(BATCH * 10), BATCH, torch.device("cpu"), torchvision_transform(AugConfig(), (28, 28)),
                             workers=2)
    list(pairs)  # start the persistent workers
    run(benchmark, lambda: list(pairs), "cpu", rounds=3, warmup=0)
    benchmark.extra_info["images_per_second"] = 2 * BATCH * 10 / benchmark.stats.stats.mean


def test_augment_tutorial_batch_wide(benchmark):
    """The tutorial's transform on a batch tensor: ONE crop and ONE rotation for all 512 (not per sample)."""
    benchmark.group = "augment-b512-cpu"
    describe(benchmark, "tutorial (one crop per batch)")
    x = images(BATCH).float().div_(255)
    run(benchmark, lambda: tutorial_batch_augment(x), "cpu", rounds=20, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * BATCH / benchmark.stats.stats.mean


@pytest.mark.parametrize("loader", ["device", "torchvision"])
@pytest.mark.parametrize("device", DEVICES)
def test_epoch_data_delivery(benchmark, loader, device):
    """60,000 images -> view pairs on the device, batch 256: everything the training step waits for."""
    skip_unless_device(device)
    benchmark.group = f"epoch-data-{device}"
    describe(benchmark, {"device": "device loader (fused)", "torchvision": "torchvision DataLoader"}[loader],
             baseline=loader == "torchvision")
    data = images(EPOCH_IMAGES)
    dev = torch.device(device)
    if loader == "device":
        pairs = DevicePairs(data, 256, dev, SimCLRAugment(cpu_kernels=dev.type == "cpu" and kernels.available()))
    else:
        pairs = TorchvisionPairs(data, 256, dev, torchvision_transform(AugConfig(), (28, 28)), workers=2)

    def epoch():
        for v1, v2 in pairs:
            pass

    run(benchmark, epoch, device, rounds=1 if not QUICK else 1, warmup=1 if loader == "torchvision" else 0)
    benchmark.extra_info["images_per_second"] = 2 * len(pairs) * 256 / benchmark.stats.stats.mean


COLOR_IMPLS = {"kernel": "fastclr, fused (CPU kernel)", "torch-ops": "fastclr, plain torch ops",
               "kornia": "Kornia ColorJitter + RandomGrayscale"}


def color_jitter(impl: str):
    """SimCLR's colour jitter (0.4, 0.4, 0.4, 0.1 at p 0.8) then greyscale at p 0.2, as ``impl`` applies it: all
    three from parameters drawn per sample, the first two by fastclr.sampling on the images' device."""
    from fastclr.color import RandomColor

    if impl == "kornia":
        import kornia.augmentation as K

        return torch.nn.Sequential(K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8, order=(0, 1, 2, 3)),
                                   K.RandomGrayscale(p=0.2))
    return RandomColor((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, cpu_kernel=impl == "kernel")


@pytest.mark.parametrize("impl", list(COLOR_IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def test_color_jitter(benchmark, device, impl):
    """The colour jitter and greyscale on 2 x 512 views of 3 x 32 x 32: fastclr's two-pass C kernel (CPU only),
    the same steps as plain torch ops (the path GPUs take), and Kornia's modules."""
    skip_unless_device(device)
    if impl == "kernel" and (device != "cpu" or not kernels.available()):
        pytest.skip("fastclr's CPU kernels: CPU only, and they must build here")
    benchmark.group = f"color-jitter-b512-{device}"
    describe(benchmark, COLOR_IMPLS[impl], baseline=impl == "kornia")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2 * BATCH, 3, 32, 32, generator=g).to(device)
    aug = color_jitter(impl)
    run(benchmark, lambda: aug(x), device, rounds=20, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * BATCH / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_blur(benchmark, impl):
    """RandomBlur (p = 1) on 2 x 512 views of 3 x 32 x 32: fastclr's one-pass C kernel against its plain torch
    passes (the path GPUs take)."""
    from fastclr.augment import RandomBlur

    if impl == "kernel" and not kernels.available():
        pytest.skip("fastclr's CPU kernels must build here")
    benchmark.group = "blur-b512-cpu"
    describe(benchmark, {"kernel": "fastclr C kernel", "torch": "torch ops"}[impl], baseline=impl == "torch")
    x = torch.rand(2 * BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blur = RandomBlur((0.1, 2.0), p=1.0, cpu_kernel=impl == "kernel")
    params = blur.draw(len(x), x.device)
    run(benchmark, lambda: blur(x, params), "cpu", rounds=20, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * BATCH / benchmark.stats.stats.mean
