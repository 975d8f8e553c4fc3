"""Checkpoints that survive kills, exact resume for both loaders, files that run no code, failed writes,
clear errors, non-finite losses, torchrun. docs/reliability.md lists each fault with its test here."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import train_cli
from fastclr import backend as B
from fastclr.backend import FastclrError
from fastclr.config import TrainConfig
from fastclr.checkpoint import read_checkpoint
from fastclr.train import train

SMALL = ["--width", "8", "--embed-dim", "16", "--proj-hidden", "32", "--proj-dim", "8", "--batch-size", "64",
         "--train-subset", "2048", "--no-eval", "--checkpoint-every", "10"]
# each loader: 2-3 epochs of 32 (device) or 16 (torchvision, whose per-image transforms in this process are the
# slow part) steps, a checkpoint every 10 steps, so the kill lands mid-epoch and the resumed run crosses epochs.
# (64 and 32 steps an epoch took 2.5 of make test's 10 minutes on a 2-core Zen 3, for the same checks.)
LOADERS = {"device": ["--loader", "device", "--epochs", "3", "--seed", "5"],
           "torchvision": ["--loader", "torchvision", "--workers", "0", "--epochs", "2", "--seed", "3",
                           "--train-subset", "1024"]}


def start(mnist_root, out, loader, *extra):
    return subprocess.Popen([sys.executable, "-m", "fastclr.train", "--data-dir", str(mnist_root), "--out", str(out),
                             *SMALL, *LOADERS[loader], *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(mnist_root, tmp_path_factory):
    runs = {}

    def run(loader):
        if loader not in runs:
            out = tmp_path_factory.mktemp("full") / loader
            p = start(mnist_root, out, loader)
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-2000:]
            runs[loader] = read_checkpoint(out / "checkpoint.pt")
        return runs[loader]
    return run


def assert_same_run(ckpt, ref, loader):
    """Bit-equal: the same step count, the same loss at every step, the same weights and optimiser state."""
    args = SMALL + LOADERS[loader]
    value = lambda flag: int(args[len(args) - 1 - args[::-1].index(flag) + 1])  # noqa: E731  (the last one given)
    assert ckpt["state"]["step"] == ref["state"]["step"] == value("--epochs") * (value("--train-subset") // 64)
    assert ckpt["state"]["losses"] == ref["state"]["losses"]
    for part in ("encoder", "head"):
        for k, v in ref[part].items():
            torch.testing.assert_close(ckpt[part][k], v, rtol=0, atol=0, msg=f"{part}.{k}")


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["device", "torchvision"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_result(sig, loader, mnist_root, tmp_path, uninterrupted):
    ref = uninterrupted(loader)
    out = tmp_path / "run"
    p = start(mnist_root, out, loader)
    wait_for(out / "checkpoint.pt", p)
    time.sleep(0.3)                               # land somewhere inside an epoch
    p.send_signal(sig)
    out_text, err = p.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert p.returncode == 128 + signal.SIGTERM
        assert "SIGTERM received" in out_text and "--resume" in out_text
    else:
        assert p.returncode == -signal.SIGKILL
    mid = read_checkpoint(out / "checkpoint.pt")  # whatever the kill left behind loads
    assert 0 < mid["state"]["step"] < ref["state"]["step"]
    assert not list(out.glob("*.tmp")) or sig == signal.SIGKILL
    p = start(mnist_root, out, loader, "--resume")
    out_text, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    assert "resumed" in out_text
    assert_same_run(read_checkpoint(out / "checkpoint.pt"), ref, loader)


def cli(*args, timeout=120):
    return train_cli(*args, timeout=timeout)


def test_out_holding_another_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    before = (out / "metrics.json").stat().st_mtime_ns
    r = cli("--out", str(out), "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert (out / "metrics.json").stat().st_mtime_ns == before
    r = cli("--out", str(tmp_path / "empty"), "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


@pytest.mark.slow
def test_truncated_dataset_via_cli(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        data = f.read_bytes()
        (raw / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("train-images") else data)
    r = cli("--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(mnist_root, tmp_path):
    cfg = TrainConfig(data_dir=str(mnist_root), out=str(tmp_path / "r"), width=4, embed_dim=8, proj_hidden=16,
                      proj_dim=8, batch_size=32, train_subset=256, eval=False)
    train(cfg, log=lambda *a: None)
    r = cli("--data-dir", str(mnist_root), "--out", str(tmp_path / "r"), "--resume", "--width", "4",
            "--embed-dim", "8", "--proj-hidden", "16", "--proj-dim", "8", "--batch-size", "64",
            "--train-subset", "256", "--no-eval")
    assert r.returncode == 2 and "--batch-size 32" in r.stderr


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(mnist_root, tmp_path, monkeypatch):
    import fastclr.train as T

    real_step, calls = T.train_step, []

    def flaky(*a, **k):
        loss = real_step(*a, **k)
        calls.append(1)
        return loss * float("nan") if len(calls) == 12 else loss

    cfg = TrainConfig(data_dir=str(mnist_root), out=str(tmp_path / "r"), width=4, embed_dim=8, proj_hidden=16,
                      proj_dim=8, batch_size=32, train_subset=256, epochs=3, eval=False, log_every=1)
    monkeypatch.setattr(T, "train_step", flaky)
    with pytest.raises(FastclrError, match="non-finite at step 12") as e:
        train(cfg, log=lambda *a: None)
    assert "temperature" in str(e.value)
    good = read_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert good["state"]["step"] == 8 and all(torch.isfinite(torch.tensor(good["state"]["losses"])))  # epoch 1's checkpoint


@pytest.mark.slow
def test_bf16_autocast_run_stays_finite_at_low_temperature(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(B, "cpu_has_native_bf16", lambda: True)   # exercise the bf16 path on any CPU
    cfg = TrainConfig(data_dir=str(mnist_root), out=str(tmp_path / "r"), width=4, embed_dim=16, proj_hidden=32,
                      proj_dim=8, batch_size=32, train_subset=640, temperature=0.05, amp=True, eval=False,
                      log_every=1)
    m = train(cfg, log=lambda *a: None)
    assert m["steps"] == 20 and m["runtime"]["amp_dtype"] == "bfloat16"
    assert all(torch.isfinite(torch.tensor(read_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]["losses"])))


@pytest.mark.gpu
def test_fp16_autocast_run_stays_finite_on_cuda(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # force fp16 + GradScaler
    cfg = TrainConfig(data_dir=str(mnist_root), out=str(tmp_path / "r"), batch_size=64, train_subset=2048,
                      temperature=0.05, amp=True, eval=False, log_every=1, device="cuda")
    m = train(cfg, log=lambda *a: None)
    assert m["runtime"]["amp_dtype"] == "float16" and m["steps"] == 32
    assert all(torch.isfinite(torch.tensor(read_checkpoint(tmp_path / "r" / "checkpoint.pt")["state"]["losses"])))


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_match_one_process(mnist_root, tmp_path):
    """Global batch 64 as 2 ranks x 32 (gloo, CPU) against 1 process x 64: same per-step losses.

    BN-free network (--arch tutorial --no-proj-bn), fp32 and no augmentation, because on CPU BatchNorm statistics are
    per rank (SyncBatchNorm needs CUDA) and each rank draws its own augmentations."""
    common = ["--data-dir", str(mnist_root), "--arch", "tutorial", "--no-proj-bn", "--no-aug", "--train-subset",
              "1024", "--max-steps", "6", "--no-eval", "--device", "cpu", "--log-every", "1", "--lr", "1e-3",
              "--no-amp"]   # fp32: bf16 rounds a 2 x 32 batch differently from 1 x 64 (~2e-4 relative)
    single = cli(*common, "--batch-size", "64", "--out", str(tmp_path / "one"), timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                            str(29500 + os.getpid() % 1000), "-m", "fastclr.train", *common, "--batch-size", "32",
                            "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = read_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two = read_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert one["state"]["step"] == two["state"]["step"] == 6
    torch.testing.assert_close(torch.tensor(two["state"]["losses"]), torch.tensor(one["state"]["losses"]),
                               rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2


def _assert_one_line_stop(r, out):
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("fastclr.train: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert f"cannot write a checkpoint to {out}" in errors[0] and "previous checkpoint" in errors[0] \
        and "intact" in errors[0]
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(mnist_root, tmp_path):
    """A real full disk: --out on a 600 KB tmpfs holds one ~440 KB checkpoint but not a second beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "run"
        r = cli("--data-dir", str(mnist_root), "--out", str(out), *SMALL, *LOADERS["device"], timeout=300)
        _assert_one_line_stop(r, out)
        assert read_checkpoint(out / "checkpoint.pt")["state"]["step"] == 10    # the first one, readable
    finally:
        subprocess.run(["umount", str(disk)])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["partial write", "folder gone"])
def test_failed_checkpoint_write_ends_the_run_cleanly(fault, mnist_root, tmp_path, monkeypatch, capsys):
    """The second checkpoint fails: a writer that dies part-way (as ENOSPC does inside torch.save), or the run
    folder removed under the run. One line, exit code 2, no .tmp, the first checkpoint untouched."""
    import shutil

    import fastclr.train as T
    real_save, calls = torch.save, []
    out = tmp_path / "run"

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2 and fault == "partial write":
            f.write(b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 0")
        return real_save(obj, f)

    def gone(*a, **k):   # the folder disappears (with its checkpoint) before the second write
        if len(calls) == 1 and fault == "folder gone":
            shutil.rmtree(out)
        return real_write(*a, **k)

    real_write = T.write_checkpoint
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(T, "write_checkpoint", gone)
    rc = T.main(["--data-dir", str(mnist_root), "--out", str(out), *SMALL, *LOADERS["device"]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("fastclr.train: error:")]
    assert len(line) == 1 and f"cannot write a checkpoint to {out}" in line[0]
    if fault == "partial write":
        assert "intact" in line[0] and not list(out.glob("*.tmp"))
        assert read_checkpoint(out / "checkpoint.pt")["state"]["step"] == 10
    else:
        assert "No such file or directory" in line[0] and "no earlier checkpoint" in line[0]
