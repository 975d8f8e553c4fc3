import shutil
import urllib.error
from pathlib import Path

import pytest
import torch

from fastclr.config import AugConfig
from fastclr.data import (DEBIAN_FASHION_MNIST, TORCHVISION_UNSUPPORTED, DevicePairs, TorchvisionPairs,
                          check_idx_file, load_dataset, resolve_data_dir, torchvision_transform)
from fastclr.errors import FastclrError
from fastclr.recipes import RECIPES


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
    from fastclr.config import TrainConfig
    from fastclr.train import build_training

    torch.manual_seed(0)
    images = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    rt = make_runtime("cpu")
    tr = build_training(TrainConfig(width=4, embed_dim=16, proj_hidden=32, proj_dim=8, batch_size=16), rt, 10)
    for pairs in (DevicePairs(images, 16, rt.device, SimCLRAugment()),
                  TorchvisionPairs(images, 16, rt.device, torchvision_transform(AugConfig(), (28, 28)), workers=0)):
        v1, v2 = next(iter(pairs))
        assert v1.shape == v2.shape == (16, 1, 28, 28) and v1.dtype == torch.float32
        assert 0 <= float(v1.min()) and float(v1.max()) <= 1 and not torch.equal(v1, v2)
        assert torch.isfinite(tr.step(v1, v2))


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
            return TorchvisionPairs(images, 8, torch.device("cpu"), torchvision_transform(AugConfig(), (28, 28)),
                                    workers=0, seed=4)
    full, part = _interrupted_then_resumed(make, 3, stop_at)
    assert len(part) == len(full) == 3 * 12
    for i, ((a1, a2), (b1, b2)) in enumerate(zip(full, part)):
        assert torch.equal(a1, b1) and torch.equal(a2, b2), f"batch {i}"


def test_torchvision_source_with_workers_resumes_in_the_same_order():
    """With worker processes the views' randomness lives in the workers, so a resumed epoch sees other views
    of the same images in the same order: identity views make the order visible."""
    n = 48
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()

    def make():
        return TorchvisionPairs(images, 4, torch.device("cpu"), torchvision_transform(AugConfig(), (2, 2), identity=True),
                                workers=2, seed=7)
    full, part = _interrupted_then_resumed(make, 2, (1, 5))
    ids = [[v1[:, 0, 0, 0].mul(255).round().long().tolist() for v1, _ in run] for run in (full, part)]
    assert ids[0] == ids[1] and len(ids[0]) == 2 * 12
    assert sorted(sum(ids[0][:12], [])) == list(range(n))       # an epoch visits every image once


# ----------------------------------------------------------------------- one AugConfig, both pipelines

def _steps(transform) -> dict:
    """torchvision's transforms in a Compose by class name (RandomApply's inner transform under its own name)."""
    out = {}
    for t in transform.transforms:
        if type(t).__name__ == "RandomApply":
            out[type(t.transforms[0]).__name__] = (t.transforms[0], t.p)
        else:
            out[type(t).__name__] = (t, getattr(t, "p", None))
    return out


def _recipe_aug(name):
    from fastclr.config import TrainConfig

    return TrainConfig.from_recipe(name).augment


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_torchvision_pipeline_honours_every_recipe_setting(recipe):
    """Each AugConfig field of every shipped recipe lands in torchvision's transform with its value."""
    cfg = _recipe_aug(recipe)
    steps = _steps(torchvision_transform(cfg, (28, 28)))
    crop, _ = steps["RandomResizedCrop"]
    assert tuple(crop.scale) == cfg.crop_scale and tuple(crop.ratio) == tuple(cfg.crop_ratio)
    assert ("RandomAffine" in steps) == cfg.has_affine and ("ElasticTransform" in steps) == (cfg.elastic_p > 0)
    if cfg.has_affine:
        affine, _ = steps["RandomAffine"]
        assert list(affine.degrees) == [-cfg.degrees, cfg.degrees] and tuple(affine.translate) == (cfg.translate,) * 2
        assert tuple(affine.scale) == tuple(cfg.zoom) and list(affine.shear)[:2] == [-cfg.shear, cfg.shear]
    if cfg.elastic_p:
        elastic, p = steps["ElasticTransform"]
        assert p == cfg.elastic_p and list(elastic.sigma) == [cfg.elastic_sigma] * 2
        assert list(elastic.alpha) == [cfg.elastic_alpha * 28] * 2            # Kornia's grid units -> torchvision's
    assert ("ColorJitter" in steps) == cfg.has_color_jitter and ("RandomGrayscale" in steps) == (cfg.gray_p > 0)
    if cfg.has_color_jitter:
        jitter, p = steps["ColorJitter"]
        assert p == cfg.color_p and jitter.hue == (-cfg.color_hue, cfg.color_hue)
        assert jitter.brightness == (1 - cfg.color_brightness, 1 + cfg.color_brightness)
    if cfg.gray_p:
        assert steps["RandomGrayscale"][1] == cfg.gray_p
    assert ("RandomHorizontalFlip" in steps) == (cfg.hflip_p > 0)
    if cfg.hflip_p:
        assert steps["RandomHorizontalFlip"][1] == cfg.hflip_p
    assert ("GaussianBlur" in steps) == (cfg.blur_p > 0)
    if cfg.blur_p:
        blur, p = steps["GaussianBlur"]
        assert p == cfg.blur_p and list(blur.sigma) == list(cfg.blur_sigma)
    lambdas = [t for t in torchvision_transform(cfg, (28, 28)).transforms if type(t).__name__ == "Lambda"]
    assert len(lambdas) == (cfg.thickness_p > 0) + cfg.has_jitter      # thickness and the jitter


def test_the_torchvision_pipeline_applies_the_jitter_and_thickness_it_is_given():
    """The two fastclr modules inside torchvision's pipeline (applied per image through a Lambda) act with the
    configured strength: p = 1 thickness changes every image; the jitter stays within its ranges."""
    from conftest import only

    x = (torch.rand(1, 28, 28) * 200).to(torch.uint8)
    thick = torchvision_transform(only("thickness", thickness_p=1.0), (28, 28))
    assert not torch.equal(thick(x), x.float() / 255)
    jitter = torchvision_transform(only("jitter", brightness=0.0, contrast=0.5, jitter_p=1.0), (28, 28))
    ratios = torch.stack([jitter(x).sum() / (x.float() / 255).sum() for _ in range(200)])
    assert 0.5 - 1e-3 <= float(ratios.min()) < 0.7 and 1.3 < float(ratios.max()) <= 1.5 + 1e-3


def test_erasing_with_the_torchvision_loader_is_honoured():
    """--erase-p with --loader torchvision: torchvision's RandomErasing with the config's p and area range."""
    cfg = AugConfig(erase_p=0.5, erase_scale=(0.05, 0.2))
    erase, p = _steps(torchvision_transform(cfg, (28, 28)))["RandomErasing"]
    assert p == 0.5 and tuple(erase.scale) == (0.05, 0.2) and erase.value == [0.0]


def test_a_setting_torchvision_cannot_express_is_refused_not_dropped():
    assert "elastic_kernel" in TORCHVISION_UNSUPPORTED
    with pytest.raises(FastclrError, match="--loader torchvision cannot honour --elastic-kernel 9.*--loader device"):
        torchvision_transform(AugConfig(elastic_kernel=9), (28, 28))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_fused_pipeline_honours_every_recipe_setting(recipe):
    """SimCLRAugment's fused ops read the recipe's AugConfig: its warp holds the config, and the thickness,
    jitter, blur and erasing steps exist exactly where their settings switch them on, with their values."""
    from fastclr.augment import SimCLRAugment

    cfg = _recipe_aug(recipe)
    ops = {type(m).__name__: m for m in SimCLRAugment(cfg).ops}
    wanted = {"crop": cfg.crop_scale is not None, "affine": cfg.has_affine, "elastic": cfg.elastic_p > 0,
              "flip": cfg.hflip_p > 0}
    assert ops["FusedWarp"].cfg is cfg and ops["FusedWarp"].steps == {k for k, on in wanted.items() if on}
    assert ("RandomThickness" in ops) == (cfg.thickness_p > 0)
    if cfg.thickness_p:
        assert ops["RandomThickness"].p == cfg.thickness_p
    assert ("RandomColor" in ops) == (cfg.has_color_jitter or cfg.gray_p > 0)
    if cfg.has_color_jitter:
        m = ops["RandomColor"]
        assert (m.factors, m.p, m.gray_p) == (cfg.color_factors, cfg.color_p, cfg.gray_p)
    assert ("RandomIntensity" in ops) == cfg.has_jitter
    if cfg.has_jitter:
        m = ops["RandomIntensity"]
        assert (m.brightness, m.contrast, m.p) == (cfg.brightness, cfg.contrast, cfg.jitter_p)
    assert ("RandomBlur" in ops) == (cfg.blur_p > 0)
    if cfg.blur_p:
        assert (ops["RandomBlur"].p, ops["RandomBlur"].sigma) == (cfg.blur_p, tuple(cfg.blur_sigma))
