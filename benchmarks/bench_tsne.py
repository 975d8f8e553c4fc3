"""t-SNE of 2,000 and 10,000 points (128-d embeddings; PCA to 50 first) per backend."""
import pytest
import torch

from fastclr import backend as B
from fastclr.eval import tsne

from .conftest import DEVICES, QUICK, describe, run, skip_unless_device

SIZES = [500] if QUICK else [2000, 10000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", ["sklearn", "cuml"])
def test_tsne(benchmark, backend, n, device):
    skip_unless_device(device)
    if backend == "cuml" and not (device == "cuda" and B.cuml_available()):
        pytest.skip("cuML needs a CUDA device and `pip install fastclr[gpu]`")
    if backend == "sklearn" and device == "cuda":
        pytest.skip("scikit-learn runs on the CPU: see the cpu group")
    benchmark.group = f"tsne-{n}"
    describe(benchmark, {"sklearn": "sklearn", "cuml": "cuML"}[backend], baseline=backend == "sklearn")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.randn(10, 128, generator=g)[y] + torch.randn(n, 128, generator=g)).to(device)
    run(benchmark, lambda: tsne(x, backend=backend), device, rounds=1, warmup=0)
    benchmark.extra_info["points_per_second"] = n / benchmark.stats.stats.mean
