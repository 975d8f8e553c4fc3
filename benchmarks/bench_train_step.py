"""One SimCLR training step (both views, fwd+bwd+AdamW) per encoder, batch and precision; and a full epoch."""
import pytest
import torch

from fastclr.augment import SimCLRAugment
from fastclr.backend import make_runtime
from fastclr.loss import NTXentLoss
from fastclr.model import build_model
from fastclr.train import train_step

from .conftest import DEVICES, QUICK, run, skip_unless_device


def setup(arch, width, batch, device, amp=False, compile=False, channels_last=True, batches=None):
    """A zero-argument training step; ``batches`` (an iterator of view pairs) feeds it, else one fixed batch."""
    rt = make_runtime(device, amp=amp, compile=compile)
    model = build_model(arch, width, 128, 256, 64, 0.13, 0.31).to(rt.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if rt.compile else model
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.needs_grad_scaler)
    loss_fn = NTXentLoss(0.2, check_finite=False)
    aug = SimCLRAugment()
    x = torch.rand(batch, 1, 28, 28, device=rt.device)
    if batches is not None:
        return lambda: train_step(net, loss_fn, opt, scaler, sched, *next(batches), rt, channels_last)
    return lambda: train_step(net, loss_fn, opt, scaler, sched, aug(x), aug(x), rt, channels_last)


CASES = [("tutorial", 16, 128, False), ("tutorial", 16, 256, False), ("cnn", 16, 256, False),
         ("cnn", 32, 256, False), ("cnn", 16, 256, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,width,batch,amp", CASES[:1] if QUICK else CASES)
def test_train_step(benchmark, arch, width, batch, amp, device):
    skip_unless_device(device)
    if amp and device == "cpu":
        pytest.skip("--amp stays fp32 on CPUs without native bf16 (see fastclr.backend)")
    benchmark.group = f"train_step-{device}"
    step = setup(arch, width, batch, device, amp)
    run(benchmark, step, device, rounds=10, warmup=2)
    benchmark.extra_info["images_per_second"] = 2 * batch / benchmark.stats.stats.mean


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_compiled(benchmark, device):
    skip_unless_device(device)
    if QUICK:
        pytest.skip("compilation takes a minute")
    benchmark.group = f"train_step-{device}"
    step = setup("cnn", 16, 256, device, amp=device == "cuda", compile=True)
    run(benchmark, step, device, rounds=10, warmup=3)
    benchmark.extra_info["images_per_second"] = 2 * 256 / benchmark.stats.stats.mean


@pytest.mark.parametrize("device", DEVICES)
def test_epoch(benchmark, device):
    """A full training epoch on 60,000 images (synthetic pixels): device-resident loader, Kornia views,
    the step; the default configuration (fastclr.config.TrainConfig)."""
    from fastclr.config import TrainConfig
    from fastclr.data import DevicePairs

    skip_unless_device(device)
    benchmark.group = f"epoch-{device}"
    cfg = TrainConfig()
    n = 1024 if QUICK else 60000
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    pairs = DevicePairs(images, cfg.batch_size, torch.device(device), SimCLRAugment(), seed=0)
    steps = len(pairs)

    def epoch():
        it = iter(pairs)
        step = setup(cfg.arch, cfg.width, cfg.batch_size, device, amp=device == "cuda", batches=it)
        for _ in range(steps):
            step()

    run(benchmark, epoch, device, rounds=1, warmup=0)
    benchmark.extra_info["images_per_second"] = 2 * cfg.batch_size * steps / benchmark.stats.stats.mean
