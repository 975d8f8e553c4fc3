"""The learning-rate schedule: lr_factor's shape, and the device-tensor evaluation (the captured step's) against
the host one (the eager LambdaLR's)."""
import pytest
import torch

from fastclr.schedule import DeviceSchedule, lr_factor, make_scheduler


def test_warmup_then_cosine_to_zero():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
    assert lr_factor(150, 10, 100) == pytest.approx(0.0)          # past the end: stays at 0


@pytest.mark.parametrize("warmup, total", [(3, 10), (1, 1), (20, 12), (0, 5)])
def test_the_device_evaluation_equals_the_host_one(warmup, total):
    """float32 on a tensor against float64 on the host: rel 1e-6."""
    for step in range(total + 3):
        got = float(lr_factor(torch.tensor(step), warmup, total))
        assert got == pytest.approx(lr_factor(step, warmup, total), rel=1e-6, abs=1e-7), step


def test_device_schedule_follows_lambdalr_and_resumes():
    """The same learning rate after every step as the eager LambdaLR (rel 1e-5: float32's 1 + cos near the end of
    the decay cancels about 4 bits; abs 1e-8 at the final 0), and a state_dict that restores
    the step count, rebinding the optimiser's lr tensor after the optimiser's own load_state_dict."""
    p = torch.nn.Parameter(torch.zeros(3))
    eager_opt, dev_opt = torch.optim.SGD([p], lr=0.5), torch.optim.SGD([p], lr=0.5)
    eager, dev = make_scheduler(eager_opt, 4, 12, on_device=False), make_scheduler(dev_opt, 4, 12, on_device=True)
    assert isinstance(dev, DeviceSchedule)
    for _ in range(14):
        assert float(dev_opt.param_groups[0]["lr"]) == pytest.approx(eager_opt.param_groups[0]["lr"], rel=1e-5,
                                                                               abs=1e-8)
        eager.step()
        dev.step()
    assert dev.state_dict() == {"last_epoch": eager.state_dict()["last_epoch"]} == {"last_epoch": 14}

    fresh_opt = torch.optim.SGD([p], lr=0.5)
    fresh = DeviceSchedule(fresh_opt, 4, 12)
    fresh_opt.load_state_dict(dev_opt.state_dict())       # replaces the group's lr with the saved tensor
    fresh.load_state_dict({"last_epoch": 6})
    assert fresh_opt.param_groups[0]["lr"] is fresh.lr_t
    assert float(fresh.lr_t) == pytest.approx(0.5 * lr_factor(6, 4, 12), rel=1e-6)
