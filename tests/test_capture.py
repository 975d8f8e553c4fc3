"""The --cuda-graph step: its body equals fastclr.train.train_step (on the CPU, run eagerly), its schedule equals
lr_factor, and on a GPU the replayed graph gives the eager losses and weights."""
import copy

import pytest
import torch

from fastclr import backend
from fastclr.capture import CapturedStep, lr_factor_tensor
from fastclr.config import TrainConfig
from fastclr.train import build_training, lr_factor, main

SMALL = dict(width=4, embed_dim=16, proj_hidden=32, proj_dim=8, batch_size=16, amp=False, warmup_steps=3, lr=3e-3)


@pytest.mark.parametrize("warmup, total", [(3, 10), (1, 1), (20, 12), (0, 5)])
def test_device_schedule_equals_lr_factor(warmup, total):
    for step in range(total + 3):
        expected = lr_factor(step, warmup, total)
        got = float(lr_factor_tensor(torch.tensor(step), warmup, total))
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-7), step


def views(n_steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 28, 28, generator=g), torch.rand(batch, 1, 28, 28, generator=g))
            for _ in range(n_steps)]


def trainings(device: str, steps: int):
    """Two Trainings with the same initial weights: the usual step, and the capturable optimiser."""
    runtime = backend.make_runtime(device, amp=False)
    torch.manual_seed(0)
    eager = build_training(TrainConfig(**SMALL), runtime, steps)
    torch.manual_seed(0)
    captured = build_training(TrainConfig(**SMALL, cuda_graph=True), runtime, steps)
    captured.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    return eager, captured


def test_captured_step_body_equals_train_step_on_the_cpu():
    """Same weights, same views: the losses, the learning rates and the weights after 8 steps agree to fp32
    rounding (rtol 1e-5); the schedule spans warm-up and decay."""
    steps = 8
    eager, cap = trainings("cpu", steps)
    step = CapturedStep(cap, SMALL["lr"], SMALL["warmup_steps"], steps, 0, (SMALL["batch_size"], 1, 28, 28),
                        capture=False)
    for v1, v2 in views(steps, SMALL["batch_size"]):
        lr_before = eager.optimizer.param_groups[0]["lr"]
        assert float(cap.optimizer.param_groups[0]["lr"]) == pytest.approx(lr_before, rel=1e-6)
        expected = eager.step(v1, v2)
        torch.testing.assert_close(step(v1, v2), expected, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.model.state_dict().items(), cap.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert int(step.step_t) == steps and float(step.lr_t) == pytest.approx(0.0, abs=1e-9)


def test_cuda_graph_on_the_cpu_is_one_clear_error(capsys, tmp_path):
    assert main(["--cuda-graph", "--device", "cpu", "--out", str(tmp_path / "r"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph needs a CUDA device" in err[0]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_replayed_graph_gives_the_eager_losses_on_cuda(amp):
    """8 steps (3 eager warm-up, capture, 5 replays) against 8 eager steps from the same weights and views:
    fp32 within 1e-4 relative (TF32 off), bf16 autocast within 2e-2."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    steps, cfg = 8, dict(SMALL, amp=amp)
    runtime = backend.make_runtime("cuda", amp=amp)
    torch.manual_seed(0)
    eager = build_training(TrainConfig(**cfg), runtime, steps)
    torch.manual_seed(0)
    cap = build_training(TrainConfig(**cfg, cuda_graph=True), runtime, steps)
    cap.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    cap.captured = CapturedStep(cap, cfg["lr"], cfg["warmup_steps"], steps, 0, (cfg["batch_size"], 1, 28, 28))
    tol = dict(rtol=2e-2, atol=1e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    with torch.cuda.device(0):
        for v1, v2 in views(steps, cfg["batch_size"]):
            v1, v2 = v1.cuda(), v2.cuda()
            torch.testing.assert_close(cap.step(v1, v2), eager.step(v1, v2), **tol)
    assert cap.captured.graph is not None
    for (name, a), b in zip(eager.model.state_dict().items(), cap.model.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), **tol, msg=name)
