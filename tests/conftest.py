import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real-data tests read MNIST from $FASTCLR_TEST_DATA (a folder holding MNIST/raw/) and skip without it.
MNIST_ROOT = Path(os.environ.get("FASTCLR_TEST_DATA", REPO / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It is read when a kernel is
# defined, so it is switched on here, before any test imports fastclr.triton_ntxent (and inherited by the
# subprocesses tests start). With a GPU the kernels run compiled, on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_root():
    if not (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"MNIST not found under {MNIST_ROOT} (set FASTCLR_TEST_DATA)")
    return MNIST_ROOT


@pytest.fixture(scope="session")
def mnist(mnist_root):
    from fastclr.data import load_dataset

    train_x, train_y = load_dataset("mnist", mnist_root, train=True)
    test_x, test_y = load_dataset("mnist", mnist_root, train=False)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def train_cli(*args, timeout=600):
    """Run ``python -m fastclr.train ARGS`` in a subprocess; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, "-m", "fastclr.train", *args], capture_output=True, text=True,
                          timeout=timeout)


OFF = {"flip": dict(hflip_p=0.0), "crop": dict(crop_min=1.0), "affine": dict(degrees=0.0, translate=0.0, shear=0.0,
                                                                                zoom=(1.0, 1.0)),
       "elastic": dict(elastic_p=0.0), "thickness": dict(thickness_p=0.0), "jitter": dict(brightness=0.0, contrast=0.0),
       "blur": dict(blur_p=0.0), "erase": dict(erase_p=0.0)}


def only(*steps, **settings):
    """An AugConfig with only ``steps`` on (at their default settings, or with a probability of 0.5 for those
    that are off by default: flip, blur, erasing), then ``settings`` over it."""
    from fastclr.config import AugConfig

    on_by_default = {"flip": dict(hflip_p=0.5), "blur": dict(blur_p=0.5), "erase": dict(erase_p=0.5),
                     "jitter": dict(brightness=0.2, contrast=0.3)}
    cfg = {}
    for step, off in OFF.items():
        cfg.update(on_by_default.get(step, {}) if step in steps else off)
    return AugConfig(**{**cfg, **settings})


# --------------------------------------------------------------------------- fastclr's CPU kernels

from fastclr import kernels  # noqa: E402

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="fastclr's CPU kernels cannot be built here")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of each kernel entry point, so that a kernels-vs-layers comparison can tell a kernel
    that ran from a silent fallback to the layers (which would compare the layers with themselves)."""
    calls = {}
    for name in ("pool_relu", "conv3x3_pool_relu", "bn_act", "stem", "conv3x3", "warp_sample", "thickness", "blur3", "color_jitter"):
        real = getattr(kernels, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(kernels, name, counted)
    return calls
