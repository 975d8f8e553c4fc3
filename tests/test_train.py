"""End to end: the CLI on real MNIST, reproducibility, clear errors, checkpoints."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import train_cli
from fastclr.config import TrainConfig
from fastclr.checkpoint import read_checkpoint
from fastclr.train import train

FAST = dict(width=4, embed_dim=16, proj_hidden=32, proj_dim=8, batch_size=32, eval=False)


@pytest.mark.slow
def test_end_to_end_on_real_mnist(mnist_root, tmp_path):
    """A few hundred steps through the CLI, then an independent k-NN on load_encoder's embeddings."""
    out = tmp_path / "run"
    r = train_cli("--data-dir", str(mnist_root), "--epochs", "1", "--max-steps", "150", "--out", str(out),
            "--tsne-points", "500", "--loss-impl", "tiled", "--width", "16", "--batch-size", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("checkpoint.pt", "metrics.json", "loss.png", "tsne.png"):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("knn_accuracy", "pixel_knn_accuracy", "linear_probe_accuracy", "epochs", "steps", "train_seconds",
                "train_images_per_second", "final_loss", "config", "device", "torch_version"):
        assert key in m, key
    assert m["steps"] == 150 and m["config"]["loss_impl"] == "tiled"
    assert m["steady_state_steps"] == [20, 150] and m["steady_images_per_second"] > 0   # losses read every 10 steps
    assert m["knn_accuracy"] > 0.95 and m["final_loss"] < 4.0

    # independent check: scikit-learn's own classifier on embeddings from the saved encoder
    from sklearn.neighbors import KNeighborsClassifier

    from fastclr.data import load_dataset
    from fastclr.eval import embed
    from fastclr.model import load_encoder

    enc = load_encoder(out / "checkpoint.pt")
    dev = torch.device("cpu")
    trx, try_ = load_dataset("mnist", mnist_root, True)
    tex, tey = load_dataset("mnist", mnist_root, False)
    tr, te = embed(enc, trx, dev).numpy(), embed(enc, tex, dev).numpy()
    clf = KNeighborsClassifier(20, metric="cosine", algorithm="brute",
                               weights=lambda d: torch.exp(torch.from_numpy(-d / 0.07)).numpy())
    acc = (clf.fit(tr, try_.numpy()).predict(te) == tey.numpy()).mean()
    assert acc == pytest.approx(m["knn_accuracy"], abs=0.002)

    # python -m fastclr.eval reproduces the metrics from the checkpoint
    r = subprocess.run([sys.executable, "-m", "fastclr.eval", "--checkpoint", str(out / "checkpoint.pt"),
                        "--tsne-points", "0", "--no-pixel-knn"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads((out / "eval_metrics.json").read_text())
    assert e["knn_accuracy"] == pytest.approx(m["knn_accuracy"], abs=1e-6)
    assert e["linear_probe_accuracy"] == pytest.approx(m["linear_probe_accuracy"], abs=2e-3)


@pytest.mark.slow
def test_seeded_runs_are_reproducible(mnist_root, tmp_path):
    states = []
    for i in range(2):
        cfg = TrainConfig(data_dir=str(mnist_root), out=str(tmp_path / f"r{i}"), train_subset=512, max_steps=6,
                          **FAST)
        m = train(cfg, log=lambda *a: None)
        states.append((m["final_loss"], read_checkpoint(tmp_path / f"r{i}" / "checkpoint.pt")["encoder"]))
    assert states[0][0] == states[1][0]
    for k in states[0][1]:
        assert torch.equal(states[0][1][k], states[1][1][k]), k


@pytest.mark.parametrize("args,message", [
    (["--dataset", "imagenet"], "unknown"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "cuda"], "no CUDA device"),
    (["--loss-impl", "fast"], "unknown"),
    (["--compile-mode", "reduce-overhead"], "add --compile"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = train_cli("--data-dir", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"), *args, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_triton_loss_where_it_cannot_run_is_refused_before_the_data(monkeypatch):
    """--loss-impl triton on the CPU without Triton's interpreter: one FastclrError from setup_runtime, where it
    used to be a RuntimeError traceback at the first step."""
    from fastclr import triton_ntxent
    from fastclr.errors import FastclrError
    from fastclr.train import setup_runtime

    monkeypatch.setattr(triton_ntxent, "interpreting", lambda: False)
    monkeypatch.setattr(triton_ntxent, "available", lambda: True)
    cfg = TrainConfig(loss_impl="triton", device="cpu")
    with pytest.raises(FastclrError, match="--loss-impl triton: .* runs on CUDA tensors"):
        setup_runtime(cfg)
    setup_runtime(TrainConfig(loss_impl="tiled", device="cpu"))


def test_steady_state_rate_leaves_out_the_warm_up_steps():
    """Marks every 10 steps: the first 20 steps took 5 s (capture, compilation), the next 40 took 0.4 s."""
    from fastclr.train import steady_images_per_second

    marks = [(10, 4.0), (20, 5.0), (30, 5.1), (40, 5.2), (50, 5.3), (60, 5.4)]
    rate, span = steady_images_per_second(marks, images_per_step=256)
    assert span == [20, 60] and rate == pytest.approx(256 * 40 / 0.4)
    assert steady_images_per_second(marks[:2], 256) == (None, None)        # one mark past warm-up: no interval
    assert steady_images_per_second(marks, 256, after=0)[0] == pytest.approx(256 * 50 / 1.4)


def test_summary_line_names_only_what_the_run_measured():
    """The CLI's last line: k-NN and raw pixels where evaluated, the speed always (a --no-eval run ends with it
    too), the steady-state figure where there is one."""
    from fastclr.train import summary_line

    speed = {"train_images_per_second": 1234.4, "train_seconds": 5.0}
    full = {**speed, "knn_accuracy": 0.98, "pixel_knn_accuracy": 0.97, "steady_images_per_second": 1500.0,
            "steady_state_steps": [20, 150]}
    assert summary_line(full) == ("knn_accuracy 0.9800 (raw pixels 0.9700), 1234 images/s over 5.0s of training "
                                  "(1500 at steady state, steps 20-150)")
    assert summary_line({**speed, "knn_accuracy": 0.98}) == "knn_accuracy 0.9800, 1234 images/s over 5.0s of training"
    assert summary_line({**speed, "steady_images_per_second": None}) == "1234 images/s over 5.0s of training"


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode is handed to torch.compile by the Runtime, the one place that decides compilation."""
    from fastclr import backend
    from fastclr.train import build_training

    seen = []
    monkeypatch.setattr(backend, "compile_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: seen.append(mode) or module)
    cfg = TrainConfig(compile=True, compile_mode="reduce-overhead", device="cpu", **FAST)
    cfg.validate()
    runtime = backend.make_runtime("cpu", compile=True, compile_mode=cfg.compile_mode)
    build_training(cfg, runtime, total_steps=1)
    assert seen == ["reduce-overhead"] and runtime.describe()["compile_mode"] == "reduce-overhead"


SPEEDRUN_SMALL = ["--width", "4", "--embed-dim", "16", "--proj-hidden", "32", "--proj-dim", "8", "--batch-size", "64",
                  "--train-subset", "2048"]


def speedrun_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastclr.speedrun", *SPEEDRUN_SMALL, *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_speedrun_reports_time_to_target(mnist_root, tmp_path):
    r = speedrun_cli("--data-dir", str(mnist_root), "--out", str(tmp_path / "r"), "--target", "0.5", "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speedrun: k-NN" in r.stdout and ">= 0.5 after 32 steps; time to target" in r.stdout
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["reached_target"] and m["target_knn"] == 0.5 and m["time_to_target_seconds"] > 0


@pytest.mark.slow
def test_speedrun_honours_target_knn_and_says_when_it_misses(mnist_root, tmp_path):
    """--target-knn is the same setting as --target (it used to be overridden silently by --target's default)."""
    r = speedrun_cli("--data-dir", str(mnist_root), "--out", str(tmp_path / "r"), "--target-knn", "0.999",
                     "--epochs", "1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "target 0.999 NOT reached in 32 steps (best k-NN 0." in r.stdout
    r = speedrun_cli("--target", "0.9", "--target-knn", "0.95")
    assert r.returncode == 2 and "disagree" in r.stderr


def test_speedrun_ended_mid_epoch_checks_its_last_step(tmp_path):
    """--max-steps ends the run before the first epoch's end: its last step is checked against the target (the
    speedrun used to find no check at all and stop with a traceback)."""
    g = np.random.default_rng(0)
    x, y = (g.random((96, 8, 8)) * 255).astype(np.uint8), np.arange(96) % 4      # labels unrelated to the images
    np.savez(tmp_path / "noise.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    args = ["--data", str(tmp_path / "noise.npz"), "--width", "16", "--embed-dim", "16", "--proj-hidden", "32",
            "--proj-dim", "8", "--batch-size", "16", "--max-steps", "2", "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "fastclr.speedrun", *args, "--out", str(tmp_path / "miss"),
                        "--target", "0.99"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "target 0.99 NOT reached in 2 steps (best k-NN" in r.stdout
    m = json.loads((tmp_path / "miss" / "metrics.json").read_text())
    assert [h["step"] for h in m["knn_history"]] == [2] and not m["reached_target"]


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_resnet18_trains_a_few_steps_with_amp_and_channels_last(shape):
    """Three steps of the real training step (bf16 autocast where the CPU has it, channels_last): the loss is
    finite and every stage's weights move."""
    from fastclr.sources import ImageData
    from fastclr.train import build_training, setup_runtime, train_step

    # width 8: the first strided shortcut's 1x1 conv then has 16 input channels. With fewer, oneDNN's 1x1 weight
    # gradient in channels_last (oneDNN issue 6035) hangs with 2 threads on AVX2 (width 2 did, in 3 of 6 runs on a
    # Zen 3) and crashes on AVX-512
    cfg = TrainConfig(arch="resnet18", width=8, batch_size=8, warmup_steps=0, channels_last=True, amp=True,
                      device="cpu")
    runtime, _ = setup_runtime(cfg)
    x = torch.randint(0, 256, (16, *shape), dtype=torch.uint8)
    data = ImageData(x, None, None, None, None, [0.5] * shape[0], [0.25] * shape[0])
    torch.manual_seed(0)
    tr = build_training(cfg, runtime, total_steps=3, data=data)
    before = [p.detach().clone() for p in tr.model.encoder.parameters()]
    views = torch.rand(2, 8, *shape)
    losses = [float(train_step(tr, views[0], views[1])) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [not torch.equal(a, b) for a, b in zip(before, tr.model.encoder.parameters())]
    assert sum(moved) >= 0.9 * len(moved)


def test_saturation_and_hue_on_one_channel_are_refused_before_the_run(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "grey.npz"
    np.savez(path, x_train=np.zeros((64, 8, 8), np.uint8), y_train=np.zeros(64, np.int64))
    r = train_cli("--data", str(path), "--color-saturation", "0.4", "--out", str(tmp_path / "run"), "--batch-size", "8")
    assert r.returncode != 0
    assert "need colour images" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
