"""fastclr.sources: .npz files, image folders and torchvision's datasets (through stand-ins) become the same
whole tensors; bad input is one clear line; small generated datasets train, evaluate and reload end to end."""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from conftest import train_cli
from fastclr.errors import FastclrError
from fastclr.sources import SourceSpec, load_source, pixel_stats, tv_tensors

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Each test decodes into a cache of its own (FASTCLR_CACHE, outside the data), so no test sees another's
    decoded images."""
    monkeypatch.setenv("FASTCLR_CACHE", str(tmp_path_factory.mktemp("cache")))


def load(path, **kw):
    return load_source(SourceSpec(str(path), **kw))


def shapes(n, c, h, w, seed=0):
    """``n`` uint8 images whose class (0-3) is a bright square's quadrant, on a dim noisy background."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = (g.random((n, h, w, c)) * 60).astype(np.uint8)
    for i, cls in enumerate(y):
        r, col = (cls // 2) * (h // 2), (cls % 2) * (w // 2)
        x[i, r: r + h // 2, col: col + w // 2] = 220
    return x, y


def write_pngs(root, x, y, mode=None):
    for i, (img, cls) in enumerate(zip(x, y)):
        (root / str(cls)).mkdir(parents=True, exist_ok=True)
        PIL.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img, mode).save(root / str(cls) / f"{i:04d}.png")


# ----------------------------------------------------------------------- .npz

def test_medmnist_npz_with_n_by_1_labels_and_only_val(tmp_path):
    x, y = shapes(40, 3, 12, 12)
    np.savez(tmp_path / "m.npz", train_images=x, train_labels=y[:, None], val_images=x[:8], val_labels=y[:8, None])
    d = load(tmp_path / "m.npz")
    assert d.train_x.shape == (40, 3, 12, 12) and d.train_x.dtype == torch.uint8
    assert torch.equal(d.train_x[5].permute(1, 2, 0), torch.from_numpy(x[5]))
    assert d.test_x.shape == (8, 3, 12, 12) and d.labelled and d.classes == ("0", "1", "2", "3")
    assert any("val_images is the test split" in n for n in d.notes)
    assert len(d.mean) == 3 and all(0 < m < 1 for m in d.mean)


def test_keras_npz_and_greyscale_images(tmp_path):
    x, y = shapes(30, 1, 8, 8)
    np.savez(tmp_path / "k.npz", x_train=x[..., 0], y_train=y, x_test=x[:6, ..., 0], y_test=y[:6])
    d = load(tmp_path / "k.npz")
    assert d.shape == (1, 8, 8) and len(d.test_x) == 6 and d.labelled


@pytest.mark.parametrize("convert", ["float [0, 1]", "int64", "channels first"])
def test_npz_of_floats_integers_or_channels_first_reads_as_the_uint8_images(tmp_path, convert):
    """Floats in [0, 1] (x 255, rounded), other integer types in [0, 255] and PyTorch's (N, C, H, W) layout give
    the same uint8 tensor as the (N, H, W, C) uint8 file, and the first lines say what was converted."""
    x, y = shapes(20, 3, 8, 8)
    a = {"float [0, 1]": x.astype(np.float32) / 255, "int64": x.astype(np.int64),
         "channels first": x.transpose(0, 3, 1, 2)}[convert]
    np.savez(tmp_path / "a.npz", x_train=a, y_train=y, x_test=a[:4], y_test=y[:4])
    d = load(tmp_path / "a.npz")
    assert torch.equal(d.train_x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.equal(d.test_x, d.train_x[:4])
    assert any(n.startswith("a.npz: x_train ") for n in d.notes)


def test_npz_without_labels_is_unlabeled(tmp_path):
    x, _ = shapes(20, 1, 8, 8)
    np.savez(tmp_path / "u.npz", train_images=x)
    d = load(tmp_path / "u.npz")
    assert d.train_y is None and not d.labelled and d.classes is None


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 8, 8), np.uint8)), "no training images: expected the key train_images"),
    (dict(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros(3, np.int64)),
     "train_labels has shape \\(3,\\) for 4 images"),
    (dict(x_train=np.full((4, 8, 8), 2.0, np.float32)), "x_train is float32 with values in \\[2, 2\\]; fastclr reads uint8"),
    (dict(x_train=np.full((4, 8, 8), np.nan, np.float32)), "x_train is float32 with values in \\[nan, nan\\]"),
    (dict(x_train=np.full((4, 8, 8), 256, np.int64)), "integers in \\[0, 255\\]: rescale them first"),
    (dict(x_train=np.zeros((4, 8, 8), bool)), "x_train is bool; fastclr reads images as uint8"),
    (dict(x_train=np.zeros((4, 8), np.uint8)), "x_train has shape \\(4, 8\\)"),
    (dict(x_train=np.zeros((4, 5, 8, 8), np.uint8)), "expected \\(N, H, W\\), \\(N, H, W, C\\) or \\(N, C, H, W\\)"),
])
def test_bad_npz_files_name_the_key_and_what_to_do(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FastclrError, match=message):
        load(tmp_path / "bad.npz")


def test_a_damaged_npz_is_one_clear_error(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FastclrError, match="cannot read .*junk.npz"):
        load(tmp_path / "junk.npz")


# ----------------------------------------------------------------------- image folders

def test_train_test_folders_give_the_splits_and_class_names(tmp_path):
    x, y = shapes(24, 3, 10, 10)
    write_pngs(tmp_path / "train", x[:16], y[:16])
    write_pngs(tmp_path / "test", x[16:], y[16:])
    d = load(tmp_path)
    assert d.train_x.shape == (16, 3, 10, 10) and d.test_x.shape == (8, 3, 10, 10)
    assert d.classes == ("0", "1", "2", "3")
    order = sorted(range(16), key=lambda i: (y[i], i))        # class folders, then file names
    assert torch.equal(d.train_x[0].permute(1, 2, 0), torch.from_numpy(x[order[0]]))
    assert d.train_y.tolist() == [int(y[i]) for i in order]


def test_one_tree_is_split_stratified_and_seeded(tmp_path):
    x, y = shapes(40, 1, 8, 8)
    write_pngs(tmp_path, x, y)
    d = load(tmp_path, test_fraction=0.2, seed=3)
    assert len(d.test_x) == 8 and sorted(d.test_y.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    again = load(tmp_path, test_fraction=0.2, seed=3)
    assert torch.equal(again.test_x, d.test_x)
    assert any("held out for evaluation" in n for n in d.notes)


def test_images_alone_are_unlabeled_and_other_files_are_skipped_with_a_count(tmp_path):
    x, _ = shapes(6, 1, 8, 8)
    for i, img in enumerate(x):
        PIL.fromarray(img[..., 0]).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    d = load(tmp_path)
    assert d.train_y is None and len(d.train_x) == 6
    assert any("skipped 1 file" in n for n in d.notes)


def test_rgba_and_palette_become_rgb_and_channels_forces_either(tmp_path):
    rgba = np.full((8, 8, 4), 200, np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    PIL.fromarray(rgba, "RGBA").save(tmp_path / "a" / "1.png")
    PIL.fromarray(np.full((8, 8), 3, np.uint8), "L").convert("P").save(tmp_path / "b" / "2.png")
    d = load(tmp_path, test_fraction=0.5)
    assert d.shape == (3, 8, 8)
    grey = load(tmp_path, channels=1, test_fraction=0.5)
    assert grey.shape == (1, 8, 8)


def test_mixed_sizes_need_image_size_which_resizes_once(tmp_path):
    (tmp_path / "a").mkdir()
    PIL.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "1.png")
    PIL.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "a" / "2.png")
    with pytest.raises(FastclrError, match="2 sizes .*8x8 \\(1\\).*--image-size"):
        load(tmp_path)
    assert load(tmp_path, image_size=16).shape == (1, 16, 16)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_image_names_the_file(tmp_path, damage):
    (tmp_path / "a").mkdir()
    PIL.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "0.png")
    PIL.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(tmp_path / "a" / "1.png")
    raw = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x89PNG junk")
    with pytest.raises(FastclrError, match="cannot decode .*1.png"):
        load(tmp_path)


def test_empty_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastclrError, match="holds no PNG, JPEG, BMP or WebP images"):
        load(tmp_path / "empty")
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "dog").mkdir()
    PIL.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "tree" / "cat" / "1.png")
    with pytest.raises(FastclrError, match="dog holds no PNG"):
        load(tmp_path / "tree")


def test_decoded_images_are_cached_and_the_cache_follows_the_files(tmp_path):
    x, y = shapes(12, 1, 8, 8)
    write_pngs(tmp_path / "d", x, y)
    first = load(tmp_path / "d")
    assert any("decoded 12 images" in n for n in first.notes)
    second = load(tmp_path / "d")
    assert any("from the decoding cache" in n for n in second.notes)
    assert torch.equal(first.train_x, second.train_x)
    f = tmp_path / "d" / "0" / "0000.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert any("decoded 12 images" in n for n in load(tmp_path / "d").notes)


def test_the_memory_check_stops_before_decoding(tmp_path, monkeypatch):
    import fastclr.backend as B

    x, y = shapes(8, 1, 8, 8)
    write_pngs(tmp_path, x, y)
    monkeypatch.setattr(B, "free_memory", lambda device: 100)
    with pytest.raises(FastclrError, match="needs about .* GiB of memory and 0.00 GiB are available"):
        load(tmp_path)


# ----------------------------------------------------------------------- torchvision's datasets, stood in

class FakeCIFAR:
    """torchvision.datasets.CIFAR10's surface: ``data`` (N, 32, 32, 3) uint8, ``targets`` a list, ``classes``."""
    classes = ["airplane", "automobile"]

    def __init__(self, root, train=True, download=False):
        n = 10 if train else 4
        self.data = np.full((n, 32, 32, 3), 7 if train else 9, np.uint8)
        self.targets = [i % 2 for i in range(n)]


class FakeSTL:
    classes = ["a", "b"]

    def __init__(self, root, split="train", download=False):
        n = {"train": 6, "test": 4, "unlabeled": 20}[split]
        self.data = np.zeros((n, 3, 96, 96), np.uint8)
        self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 2


class Offline:
    def __init__(self, root, **kw):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz: <urlopen error [Errno -3]>")


def test_torchvision_datasets_convert_to_fastclrs_tensors(tmp_path):
    from fastclr.sources import _torchvision_dataset

    d = _torchvision_dataset(SourceSpec("cifar10", str(tmp_path)), types.SimpleNamespace(CIFAR10=FakeCIFAR))
    assert d.train_x.shape == (10, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_y.tolist() == [0, 1] * 5 and d.classes == ("airplane", "automobile")
    stl = _torchvision_dataset(SourceSpec("stl10", str(tmp_path)), types.SimpleNamespace(STL10=FakeSTL))
    assert stl.pretrain_x.shape == (26, 3, 96, 96) and len(stl.train_x) == 6 and stl.labelled
    x, y, classes = tv_tensors(FakeSTL(None, "unlabeled"))
    assert y is None and x.shape == (20, 3, 96, 96)


def test_an_offline_torchvision_dataset_is_one_line_saying_what_to_do(tmp_path):
    from fastclr.sources import _torchvision_dataset

    with pytest.raises(FastclrError, match="cifar10 is not under .* could not be downloaded.*internet access"):
        _torchvision_dataset(SourceSpec("cifar10", str(tmp_path)), types.SimpleNamespace(CIFAR10=Offline))


def test_pixel_stats_are_per_channel():
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    x[:, 1] = 255
    x[:2, 2] = 255
    mean, std = pixel_stats(x)
    assert mean == pytest.approx((0.0, 1.0, 0.5)) and std == pytest.approx((0.0, 0.0, 0.5), abs=1e-5)


# ----------------------------------------------------------------------- end to end, through the CLI

SMALL = ["--width", "16", "--embed-dim", "16", "--proj-hidden", "32", "--proj-dim", "8", "--batch-size", "16",
         "--epochs", "1", "--tsne-points", "20", "--no-linear-probe"]


@pytest.mark.slow
def test_colour_npz_and_rgb_folder_train_evaluate_and_reload(tmp_path, capsys):
    """The .npz in this process (fastclr.train.train, fastclr.eval.main), the folder through both CLIs."""
    from fastclr.config import TrainConfig
    from fastclr.eval import main as eval_main
    from fastclr.model import load_encoder
    from fastclr.train import train

    x, y = shapes(96, 3, 16, 16)
    np.savez(tmp_path / "c.npz", train_images=x[:64], train_labels=y[:64], test_images=x[64:], test_labels=y[64:])
    write_pngs(tmp_path / "f" / "train", x[:64], y[:64])
    write_pngs(tmp_path / "f" / "test", x[64:], y[64:])
    small = dict(width=16, embed_dim=16, proj_hidden=32, proj_dim=8, batch_size=16, epochs=1, tsne_points=20,
                 linear_probe=False)
    m = train(TrainConfig(dataset=str(tmp_path / "c.npz"), out=str(tmp_path / "run-npz"), **small), log=lambda *a: None)
    assert eval_main(["--checkpoint", str(tmp_path / "run-npz" / "checkpoint.pt"), "--device", "cpu"]) == 0
    (tmp_path / "c.npz").rename(tmp_path / "moved.npz")      # the saved run's data is elsewhere now: say --data
    assert eval_main(["--checkpoint", str(tmp_path / "run-npz" / "checkpoint.pt"), "--device", "cpu"]) == 2
    assert "pass --data to say where it is now" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(tmp_path / "run-npz" / "checkpoint.pt"), "--device", "cpu",
                      "--data", str(tmp_path / "moved.npz")]) == 0
    runs = [(tmp_path / "run-npz", m)]
    out = tmp_path / "run-folder"
    r = train_cli("--data", str(tmp_path / "f"), "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    r = train_cli_eval(out / "checkpoint.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    runs.append((out, json.loads((out / "metrics.json").read_text())))
    for out, m in runs:
        assert 0 <= m["knn_accuracy"] <= 1 and m["config"]["dataset"].startswith(str(tmp_path))
        enc = load_encoder(out / "checkpoint.pt")
        assert enc.hparams["in_channels"] == 3 and enc(torch.rand(2, 3, 16, 16)).shape == (2, 16)
        assert json.loads((out / "eval_metrics.json").read_text())["knn_accuracy"] == pytest.approx(
            m["knn_accuracy"], abs=1e-6)


def train_cli_eval(checkpoint):
    import subprocess

    return subprocess.run([sys.executable, "-m", "fastclr.eval", "--checkpoint", str(checkpoint), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_an_unlabeled_folder_trains_and_says_what_evaluation_skipped(tmp_path, capsys):
    x, _ = shapes(48, 1, 12, 12)
    (tmp_path / "data").mkdir()
    for i, img in enumerate(x):
        PIL.fromarray(img[..., 0]).save(tmp_path / "data" / f"{i}.png")
    out = tmp_path / "run"
    r = train_cli("--data", str(tmp_path / "data"), "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped: the data has no labels" in r.stdout
    assert (out / "tsne.png").is_file() and (out / "checkpoint.pt").is_file()
    from fastclr.train import main

    assert main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "r2"), "--target-knn", "0.9", *SMALL]) == 2
    assert "--target-knn needs labels" in capsys.readouterr().err and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty").mkdir(), "holds no PNG"),
    (lambda p: np.savez(p / "empty.npz", labels=np.zeros(3)), "no training images"),
    (lambda p: np.savez(p / "tiny.npz", x_train=np.zeros((160, 3, 3), np.uint8), y_train=np.arange(160) % 4,
                        x_test=np.zeros((8, 3, 3), np.uint8), y_test=np.arange(8) % 4), "too small for the encoders"),
])
def test_bad_data_through_the_cli_is_one_line_and_leaves_no_run_folder(tmp_path, make, message):
    make(tmp_path)
    target = next(p for p in tmp_path.iterdir() if p.name in ("empty", "empty.npz", "tiny.npz"))
    r = train_cli("--data", str(target), "--out", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_peek_channels_reads_the_source_without_loading_it(tmp_path):
    from fastclr.sources import peek_channels

    np.savez(tmp_path / "rgb.npz", train_images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez_compressed(tmp_path / "grey.npz", x_train=np.zeros((4, 8, 8), np.uint8))
    write_pngs(tmp_path / "folder", *shapes(4, 3, 8, 8))
    write_pngs(tmp_path / "greys", *shapes(4, 1, 8, 8))
    assert [peek_channels(str(tmp_path / n)) for n in ("rgb.npz", "grey.npz", "folder", "greys")] == [3, 1, 3, 1]
    assert (peek_channels("mnist"), peek_channels("kmnist"), peek_channels("cifar10"), peek_channels("stl10")) == (1, 1, 3, 3)
    assert peek_channels(str(tmp_path / "missing")) == 1 and peek_channels(str(tmp_path / "rgb.npz"), channels=1) == 1
