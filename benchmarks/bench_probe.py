"""Linear probe (logistic regression on frozen features), 60,000 train x 10,000 test, per backend."""
import pytest
import torch

from fastclr.eval import linear_probe_accuracy

from .conftest import DEVICES, QUICK, describe, run, skip_unless_device

N_TRAIN, N_TEST = (6000, 1000) if QUICK else (60000, 10000)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [128])
@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_linear_probe(benchmark, backend, dim, device):
    skip_unless_device(device)
    if backend == "sklearn" and device == "cuda":
        pytest.skip("scikit-learn runs on the CPU: see the cpu group")
    benchmark.group = f"probe-{device}-{dim}d"
    describe(benchmark, {"torch": "torch L-BFGS", "sklearn": "sklearn LogisticRegression"}[backend],
             baseline=backend == "sklearn")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=g)
    x = (torch.randn(10, dim, generator=g)[y] * 0.5 + torch.randn(N_TRAIN + N_TEST, dim, generator=g)).to(device)
    fn = lambda: linear_probe_accuracy(x[:N_TRAIN], y[:N_TRAIN].to(device), x[N_TRAIN:], y[N_TRAIN:], backend=backend)
    acc = run(benchmark, fn, device, rounds=1, warmup=0)
    benchmark.extra_info["accuracy"] = acc
    benchmark.extra_info["samples_per_second"] = N_TRAIN / benchmark.stats.stats.mean
