"""fastclr's data pipeline against lightly's (SimCLRTransform in a DataLoader with 2 workers): view pairs for 8
batches of 128 from 3 x 32 x 32 and 1 x 28 x 28 images, no model. The whole side-by-side with training and
k-NN is ``python -m benchmarks.compare_lightly``. Skips in one line without lightly
(``pip install --no-deps lightly lightning-utilities``)."""
import pytest
import torch

from fastclr import kernels
from fastclr.augment import SimCLRAugment
from fastclr.config import TrainConfig
from fastclr.data import DevicePairs

from .conftest import describe, run

lightly = pytest.importorskip("lightly.transforms", reason="lightly is not installed (pip install --no-deps lightly "
                                                           "lightning-utilities)")

BATCH, BATCHES = 128, 8
SHAPES = {"colour-3x32x32": ((3, 32, 32), "custom-color"), "grey-1x28x28": ((1, 28, 28), "mnist")}


def images(shape, n=BATCH * BATCHES):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("side", ["fastclr", "lightly"])
@pytest.mark.parametrize("data", list(SHAPES))
def test_view_pairs_vs_lightly(benchmark, data, side):
    from benchmarks.compare_lightly import PILTwoViews, lightly_settings

    shape, recipe = SHAPES[data]
    aug = TrainConfig.from_recipe(recipe).augment.scaled_to(shape[1:])
    x = images(shape)
    benchmark.group = f"vs-lightly-data-{data}"
    describe(benchmark, {"fastclr": "fastclr device loader (fused)", "lightly": "lightly, 2 workers"}[side],
             baseline=side == "lightly")
    if side == "fastclr":
        pairs = DevicePairs(x, BATCH, torch.device("cpu"), SimCLRAugment(aug, shape[1:], cpu_kernels=kernels.available()))
        batches = lambda: list(pairs)  # noqa: E731
    else:
        kwargs, _ = lightly_settings(aug, shape[1], 0.5, 0.25, shape[0])
        loader = torch.utils.data.DataLoader(PILTwoViews(x, lightly.SimCLRTransform(**kwargs)), batch_size=BATCH,
                                             shuffle=True, num_workers=2, drop_last=True)
        batches = lambda: list(loader)  # noqa: E731
    run(benchmark, batches, "cpu", rounds=3, warmup=1)
    benchmark.extra_info["images_per_second"] = 2 * BATCH * BATCHES / benchmark.stats.stats.mean
