"""The --cuda-graph step: on the CPU (run eagerly on its static buffers) it equals the eager train_step; on a
GPU the replayed graph gives the eager losses and weights."""
import copy

import pytest
import torch

from fastclr import backend
from fastclr.config import TrainConfig
from fastclr.schedule import DeviceSchedule
from fastclr.train import build_training, main

SMALL = dict(width=4, embed_dim=16, proj_hidden=32, proj_dim=8, batch_size=16, amp=False, warmup_steps=3, lr=3e-3)


def views(n_steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 28, 28, generator=g), torch.rand(batch, 1, 28, 28, generator=g))
            for _ in range(n_steps)]


def trainings(device: str, steps: int, **cfg):
    """Two Trainings with the same initial weights: the eager step, and the captured one (build_training wires
    it for --cuda-graph; off CUDA it runs eagerly)."""
    runtime = backend.make_runtime(device, amp=cfg.get("amp", False))
    torch.manual_seed(0)
    eager = build_training(TrainConfig(**{**SMALL, **cfg}), runtime, steps)
    torch.manual_seed(0)
    captured = build_training(TrainConfig(**{**SMALL, **cfg}, cuda_graph=True), runtime, steps)
    captured.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    return eager, captured


def test_build_training_owns_the_captured_step():
    eager, cap = trainings("cpu", 4)
    assert eager.captured is None and cap.captured is not None
    assert isinstance(cap.scheduler, DeviceSchedule) and not isinstance(eager.scheduler, DeviceSchedule)


def test_captured_step_equals_train_step_on_the_cpu():
    """Same weights, same views: the losses, the learning rates and the weights after 8 steps agree to fp32
    rounding (rtol 1e-5); the schedule spans warm-up and decay."""
    steps = 8
    eager, cap = trainings("cpu", steps)
    for v1, v2 in views(steps, SMALL["batch_size"]):
        assert float(cap.optimizer.param_groups[0]["lr"]) == pytest.approx(eager.optimizer.param_groups[0]["lr"],
                                                                           rel=1e-6)
        expected = eager.step(v1, v2)
        torch.testing.assert_close(cap.step(v1, v2), expected, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.model.state_dict().items(), cap.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert int(cap.scheduler.step_t) == steps and float(cap.scheduler.lr_t) == pytest.approx(0.0, abs=1e-9)


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
    eager, cap = trainings("cuda", 8, amp=amp)
    tol = dict(rtol=2e-2, atol=1e-3) if amp else dict(rtol=1e-4, atol=1e-5)
    with torch.cuda.device(0):
        for v1, v2 in views(8, SMALL["batch_size"]):
            v1, v2 = v1.cuda(), v2.cuda()
            torch.testing.assert_close(cap.step(v1, v2), eager.step(v1, v2), **tol)
    assert cap.captured.graph is not None
    for (name, a), b in zip(eager.model.state_dict().items(), cap.model.state_dict().values()):
        torch.testing.assert_close(b.float(), a.float(), **tol, msg=name)
