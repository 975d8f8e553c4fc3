import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from fastclr.backend import FastclrError
from fastclr.data import (DEBIAN_FASHION_MNIST, DevicePairs, TorchvisionPairs, check_idx_file, load_dataset,
                          resolve_data_dir)


def test_real_mnist_loads_as_uint8_tensors(mnist):
    assert mnist["train_x"].shape == (60000, 1, 28, 28) and mnist["train_x"].dtype == torch.uint8
    assert mnist["test_x"].shape == (10000, 1, 28, 28)
    assert mnist["train_y"].dtype == torch.int64 and set(mnist["test_y"].unique().tolist()) == set(range(10))


def test_data_dir_resolution(monkeypatch):
    monkeypatch.setenv("FASTCLR_DATA", "/some/where")
    assert resolve_data_dir(None) == Path("/some/where")
    assert resolve_data_dir("x") == Path("x")
    monkeypatch.delenv("FASTCLR_DATA")
    assert resolve_data_dir(None) == Path("data")


def _copy_mnist(src_root, dst_root):
    raw = dst_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (src_root / "MNIST" / "raw").glob("t10k-*-ubyte"):
        shutil.copy(f, raw / f.name)
    return raw


def test_truncated_file_fails_with_one_clear_message(mnist_root, tmp_path):
    raw = _copy_mnist(mnist_root, tmp_path)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100000])
    with pytest.raises(FastclrError, match="truncated") as e:
        load_dataset("mnist", tmp_path, train=False)
    assert str(images) in str(e.value)


def test_wrong_magic_detected(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(10))
    check_idx_file(p, 2049, (10,))
    with pytest.raises(FastclrError, match="not the expected IDX"):
        check_idx_file(p, 2051, (10,))


def test_missing_files_offline_fail_clearly(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(FastclrError) as e:
        load_dataset("mnist", tmp_path, train=True)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "could not be downloaded" in msg and "--data-dir" in msg


def test_unknown_dataset():
    with pytest.raises(FastclrError, match="unknown dataset"):
        load_dataset("cifar", "x")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(tmp_path):
    x, y = load_dataset("fashion-mnist", tmp_path, train=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8 and int(y.max()) == 9
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def identity(x):
    return x


def test_device_pairs_visit_every_index_once_and_reshuffle():
    n, bs = 103, 10
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    pairs = DevicePairs(images, bs, torch.device("cpu"), identity, seed=0)
    assert len(pairs) == 10
    epochs = []
    for _ in range(2):
        seen = [v1[:, 0, 0, 0].mul(255).round().long() for v1, v2 in pairs]
        assert all(len(s) == bs for s in seen)
        flat = torch.cat(seen)
        assert len(set(flat.tolist())) == 100  # drop-last: 100 distinct of 103, none twice
        epochs.append(flat)
    assert not torch.equal(epochs[0], epochs[1])


def test_device_pairs_shards_are_disjoint():
    images = torch.zeros(40, 1, 2, 2, dtype=torch.uint8)
    shards = [set(DevicePairs(images, 5, torch.device("cpu"), identity, seed=3, rank=r, world_size=2)
                  .epoch_indices().tolist()) for r in range(2)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 40


def test_both_loaders_feed_the_same_training_step():
    from fastclr.augment import SimCLRAugment
    from fastclr.backend import make_runtime
    from fastclr.loss import NTXentLoss
    from fastclr.model import build_model
    from fastclr.train import train_step

    torch.manual_seed(0)
    images = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    rt = make_runtime("cpu")
    model = build_model("cnn", 4, 16, 32, 8, 0.13, 0.31)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for pairs in (DevicePairs(images, 16, rt.device, SimCLRAugment()),
                  TorchvisionPairs(images, 16, rt.device, workers=0)):
        v1, v2 = next(iter(pairs))
        assert v1.shape == v2.shape == (16, 1, 28, 28) and v1.dtype == torch.float32
        assert 0 <= float(v1.min()) and float(v1.max()) <= 1 and not torch.equal(v1, v2)
        loss = train_step(model, NTXentLoss(0.5), opt, scaler, sched, v1, v2, rt)
        assert torch.isfinite(loss)


def test_device_pairs_restart_mid_block_makes_the_same_views():
    """Views come in blocks of several batches, each block seeded on its own: starting the epoch at a batch
    inside a block (a resumed run) yields exactly the views the uninterrupted epoch yielded from there."""
    from fastclr.augment import SimCLRAugment

    images = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8)
    pairs = DevicePairs(images, 8, torch.device("cpu"), SimCLRAugment(), seed=1, block_views=64)   # 4 batches a block
    assert pairs.block == 4
    state = pairs.generator.get_state()
    full = list(pairs)
    pairs.generator.set_state(state)
    resumed = list(pairs.iterate(6))
    assert len(resumed) == len(full) - 6
    for (a1, a2), (b1, b2) in zip(full[6:], resumed):
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(full[0][0], full[0][1])              # two different views of each image


def _interrupted_then_resumed(make, epochs: int, stop_at: tuple[int, int]):
    """Run ``make()``'s source for ``epochs`` epochs, and again with a stop after batch ``stop_at`` = (epoch,
    batch) followed by a fresh source resumed from the stopped one's state_dict (and global RNG), as a
    checkpoint does. Returns both runs' batches."""
    torch.manual_seed(0)
    source = make()
    full = [b for _ in range(epochs) for b in source]
    torch.manual_seed(0)
    first, (stop_epoch, stop_batch) = make(), stop_at
    part = [b for _ in range(stop_epoch) for b in first]
    it = first.iterate(0)
    part += [next(it) for _ in range(stop_batch)]
    saved, rng = first.state_dict(), torch.get_rng_state()
    torch.manual_seed(123)                                     # what a new process would have instead
    second = make()
    second.load_state_dict(saved)
    torch.set_rng_state(rng)
    part += list(second.iterate(stop_batch))
    part += [b for _ in range(epochs - stop_epoch - 1) for b in second]
    return full, part


@pytest.mark.parametrize("loader", ["device", "torchvision"])
@pytest.mark.parametrize("stop_at", [(0, 3), (1, 0), (1, 5)])
def test_a_resumed_source_yields_exactly_the_uninterrupted_views(loader, stop_at):
    """The PairSource contract both loaders keep: state_dict() mid-epoch (or at a boundary), a new source,
    load_state_dict(), iterate(start) -> the same batches, bit for bit (torchvision: workers=0)."""
    from fastclr.augment import SimCLRAugment

    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if loader == "device":
        def make():
            return DevicePairs(images, 8, torch.device("cpu"), SimCLRAugment(), seed=4, block_views=32)
    else:
        def make():
            return TorchvisionPairs(images, 8, torch.device("cpu"), workers=0, seed=4)
    full, part = _interrupted_then_resumed(make, 3, stop_at)
    assert len(part) == len(full) == 3 * 12
    for i, ((a1, a2), (b1, b2)) in enumerate(zip(full, part)):
        assert torch.equal(a1, b1) and torch.equal(a2, b2), f"batch {i}"


def test_torchvision_source_with_workers_resumes_in_the_same_order():
    """With worker processes the views' randomness lives in the workers, so a resumed epoch sees other views
    of the same images in the same order: identity views make the order visible."""
    from fastclr.data import torchvision_transform

    n = 48
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()

    def make():
        return TorchvisionPairs(images, 4, torch.device("cpu"), workers=2, seed=7,
                                transform=torchvision_transform(identity=True))
    full, part = _interrupted_then_resumed(make, 2, (1, 5))
    ids = [[v1[:, 0, 0, 0].mul(255).round().long().tolist() for v1, _ in run] for run in (full, part)]
    assert ids[0] == ids[1] and len(ids[0]) == 2 * 12
    assert sorted(sum(ids[0][:12], [])) == list(range(n))       # an epoch visits every image once
