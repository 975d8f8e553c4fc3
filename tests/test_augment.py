import pytest
import torch

from fastclr.augment import SimCLRAugment


def digit_like(n=1):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0   # a vertical stroke
    x[:, :, 6:10, 8:20] = 0.7    # and a bar across it
    return x


def test_per_sample_parameters_give_distinct_views():
    torch.manual_seed(0)
    out = SimCLRAugment()(digit_like(1).repeat(64, 1, 1, 1))
    distinct = {tuple(v.flatten().mul(1000).round().int().tolist()) for v in out}
    assert len(distinct) >= 60


def test_seeded_calls_are_reproducible_and_two_calls_differ():
    aug = SimCLRAugment(erase_p=0.5, blur_p=0.5)
    x = digit_like(8)
    torch.manual_seed(123)
    a, b = aug(x), aug(x)
    torch.manual_seed(123)
    a2 = aug(x)
    torch.testing.assert_close(a, a2, rtol=0, atol=0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keeps_shape_dtype_device_and_range(dtype):
    x = torch.rand(16, 1, 28, 28).to(dtype)
    y = SimCLRAugment(erase_p=0.5)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_switches_turn_ops_off():
    x = digit_like(4)
    ident = SimCLRAugment(crop_scale=None, degrees=0, translate=0, shear=0, scale=(1.0, 1.0), thickness_p=0,
                          elastic_p=0)
    assert len(ident.ops) == 0
    torch.testing.assert_close(ident(x), x)


@pytest.mark.gpu
def test_runs_on_cuda():
    x = digit_like(32).cuda()
    y = SimCLRAugment()(x)
    assert y.is_cuda and y.shape == x.shape


def test_random_thickness_dilates_or_erodes_per_sample():
    from fastclr.augment import RandomThickness

    torch.manual_seed(0)
    x = digit_like(200)
    y = RandomThickness(p=1.0)(x)
    thicker = (y.sum((1, 2, 3)) > x.sum((1, 2, 3)))
    thinner = (y.sum((1, 2, 3)) < x.sum((1, 2, 3)))
    assert bool((thicker | thinner).all())                 # p=1: every sample changed
    assert 60 < int(thicker.sum()) < 140                    # about half each way, drawn per sample
    torch.testing.assert_close(RandomThickness(p=0.0)(x), x)


def test_elastic_option_keeps_range():
    torch.manual_seed(0)
    y = SimCLRAugment(elastic_p=1.0, thickness_p=0.5)(digit_like(8))
    assert y.shape == (8, 1, 28, 28) and float(y.min()) >= 0 and float(y.max()) <= 1


def test_separable_max_filter_equals_max_pool():
    import torch.nn.functional as F

    from fastclr.augment import _max3x3

    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(_max3x3(x), F.max_pool2d(x, 3, stride=1, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(-_max3x3(-x), -F.max_pool2d(-x, 3, stride=1, padding=1), rtol=0, atol=0)
