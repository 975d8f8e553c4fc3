"""fastclr.color: the colour jitter and random greyscale equal Kornia's ColorJitter (order 0, 1, 2, 3) and
RandomGrayscale on the same parameters, in both implementations (PyTorch ops and the C kernel), and draw
Kornia's distributions (two-sample Kolmogorov-Smirnov tests as tests/test_sampling.py's)."""
import kornia.augmentation as K
import pytest
import torch

from fastclr import kernels, sampling
from fastclr.augment import SimCLRAugment
from fastclr.color import RandomColor, jitter_ops, luma, packed, shift_hue
from fastclr.config import AugConfig

from conftest import needs_kernels
from test_sampling import P_SAME, P_WRONG, ks

TOL = 2e-6      # float32: the same steps, rounded differently (a few ulps of values in [0, 1])


def images(b, c, h, w, seed=0):
    """Random pixels plus the cases a colour transform gets wrong: black, white, grey (no hue), pure primaries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    x[0, :, 0, :] = 0.0
    x[0, :, 1, :] = 1.0
    x[1, :, 0, :] = 0.5
    if c == 3:
        x[1, :, 1, 0], x[1, :, 1, 1], x[1, :, 1, 2] = torch.eye(3)
    return x


def kornias(x, params, factors):
    """Kornia's ColorJitter(order 0..3) then RandomGrayscale, on ``params`` (p < 1: Kornia's modules consult a given
    batch_prob only then)."""
    jitter = K.ColorJitter(*factors, p=0.5, order=(0, 1, 2, 3))
    kp = {k: v for k, v in params.items() if k.endswith("_factor")}
    y = jitter(x, params={**kp, "batch_prob": params["batch_prob"] > 0.5, "order": torch.arange(4)})
    grey = K.RandomGrayscale(p=0.5)
    return grey(y, params={"batch_prob": params["gray"]}) if x.shape[1] == 3 else y


SHAPES = [(16, 3, 8, 8), (33, 3, 28, 28), (8, 3, 32, 48), (6, 3, 9, 7), (16, 1, 28, 28), (5, 1, 13, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factors", [(0.4, 0.4, 0.4, 0.1), (0.8, 0.2, 1.0, 0.5), (0.0, 0.6, 0.0, 0.0)])
def test_jitter_ops_equal_kornias_color_jitter_then_grayscale(shape, factors):
    if shape[1] == 1:
        factors = (factors[0], factors[1], 0.0, 0.0)
    torch.manual_seed(1)
    aug = RandomColor(factors, p=0.7, gray_p=0.3)
    x = images(*shape)
    params = aug.draw(shape[0], "cpu")
    assert 0 < float(params["batch_prob"].sum()) < shape[0] or shape[0] < 8
    ours = jitter_ops(x, params)
    assert (ours - kornias(x, params, factors)).abs().max() <= TOL
    untouched = (params["batch_prob"] < 0.5) & (params["gray"] < 0.5)
    assert torch.equal(ours[untouched], x[untouched])          # exactly as they were, not a round trip


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hue", [0.0, 0.1, 0.5])
def test_kernel_equals_jitter_ops(shape, hue):
    c = shape[1]
    factors = (0.4, 0.4, 0.4 if c == 3 else 0.0, hue if c == 3 else 0.0)
    aug = RandomColor(factors, p=0.8, gray_p=0.2)
    x = images(*shape, seed=3)
    torch.manual_seed(2)
    params = aug.draw(shape[0], "cpu")
    out = kernels.color_jitter(x, packed(params))
    assert (out - jitter_ops(x, params)).abs().max() <= TOL
    assert (out - kornias(x, params, factors)).abs().max() <= TOL


@needs_kernels
def test_module_takes_the_kernel_on_cpu_when_asked(kernel_calls):
    x = images(8, 3, 16, 16)
    torch.manual_seed(0)
    a = RandomColor(cpu_kernel=True)(x)
    torch.manual_seed(0)
    b = RandomColor(cpu_kernel=False)(x)
    assert kernel_calls.get("color_jitter") == 1
    assert (a - b).abs().max() <= TOL


def test_hue_shift_by_whole_turns_is_the_identity_and_half_a_turn_inverts():
    x = images(4, 3, 8, 8)
    zero = torch.zeros(4, 1, 1, 1)
    assert (shift_hue(x, zero) - x).abs().max() <= TOL
    half = shift_hue(shift_hue(x, zero + 0.5), zero + 0.5)
    assert (half - x).abs().max() <= 1e-5
    # pure red turned a third of the way round is pure green
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(shift_hue(red, torch.full((1, 1, 1, 1), 1 / 3)), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1),
                          atol=1e-6)


def test_saturation_and_hue_are_refused_on_one_channel():
    with pytest.raises(ValueError, match="3 channels"):
        RandomColor((0.4, 0.4, 0.4, 0.0))(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        RandomColor((0.0, 0.0, 0.0, 0.1))(torch.rand(2, 1, 8, 8))
    y = RandomColor((0.4, 0.4, 0.0, 0.0), gray_p=1.0)(torch.rand(2, 1, 8, 8))     # greyscale: a no-op
    assert y.shape == (2, 1, 8, 8)


def test_greyscale_is_kornias_luma():
    x = images(6, 3, 8, 8)
    params = RandomColor((0, 0, 0, 0), p=0.0, gray_p=1.0).draw(6, "cpu")
    y = jitter_ops(x, params)
    assert (y - K.RandomGrayscale(p=1.0)(x)).abs().max() <= TOL
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert (y[:, :1] - luma(x)).abs().max() <= TOL


N = 20_000


@pytest.mark.parametrize("factors", [(0.4, 0.4, 0.4, 0.1), (0.8, 1.0, 0.2, 0.5)])
def test_color_sampler_matches_kornias(factors):
    jitter = K.ColorJitter(*factors, p=0.8)
    torch.manual_seed(5)
    theirs = jitter.forward_parameters(torch.Size((N, 3, 4, 4)))
    torch.manual_seed(6)
    ours = sampling.color_jitter(N, factors, 0.8, "cpu")
    on = theirs["batch_prob"]
    for key in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"):
        assert len(theirs[key]) == N
        assert ks(ours[key], theirs[key]) > P_SAME, key
        assert ks(ours[key] * 1.05 + 0.01, theirs[key]) < P_WRONG, key
    assert abs(float(ours["batch_prob"].mean()) - float(on.float().mean())) < 0.015


def test_greyscale_coin_matches_kornias():
    torch.manual_seed(5)
    theirs = K.RandomGrayscale(p=0.2).forward_parameters(torch.Size((N, 3, 4, 4)))["batch_prob"].float()
    ours = RandomColor(gray_p=0.2).draw(N, "cpu")["gray"]
    assert abs(float(ours.mean()) - float(theirs.mean())) < 0.015 and set(ours.unique().tolist()) == {0.0, 1.0}


COLOR = dict(color_brightness=0.4, color_contrast=0.4, color_saturation=0.4, color_hue=0.1, gray_p=0.2)


def test_both_pipelines_build_the_colour_steps_in_place():
    cfg = AugConfig(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.5, **COLOR)
    assert [type(m).__name__ for m in SimCLRAugment(cfg).ops] == [
        "RandomThickness", "FusedWarp", "RandomColor", "RandomIntensity", "RandomBlur"]
    kinds = [type(m).__name__ for m in SimCLRAugment(cfg, impl="kornia").ops]
    assert kinds[-4:] == ["ColorJitter", "RandomGrayscale", "RandomIntensity", "RandomGaussianBlur"]
    jitter = SimCLRAugment(cfg, impl="kornia").ops[-4]
    assert jitter._fixed_order == (0, 1, 2, 3) and jitter.p == 0.8
    gray_only = AugConfig(gray_p=0.5)
    assert [type(m).__name__ for m in SimCLRAugment(gray_only).ops][-1] == "RandomColor"


@pytest.mark.parametrize("impl", ["fused", "kornia"])
def test_colour_views_change_colour_per_sample(impl):
    """A flat red image: its views differ in hue and saturation from sample to sample, and some are grey."""
    cfg = AugConfig(crop_min=1.0, degrees=0, translate=0, shear=0, zoom=(1.0, 1.0), thickness_p=0, elastic_p=0,
                    color_p=1.0, **COLOR)
    x = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1).expand(256, 3, 8, 8).contiguous()
    torch.manual_seed(0)
    y = SimCLRAugment(cfg, (8, 8), impl=impl)(x)
    pixel = y[:, :, 4, 4]
    grey = (pixel.amax(1) - pixel.amin(1)) < 1e-6
    assert 20 < int(grey.sum()) < 90                             # p 0.2 of 256
    assert pixel[~grey].std(0).min() > 0.02                      # colours spread per sample


def test_torchvision_pipeline_honours_the_colour_settings():
    from torchvision.transforms import v2

    from fastclr.data import torchvision_transform

    t = torchvision_transform(AugConfig(**COLOR), (28, 28))
    kinds = [type(s).__name__ for s in t.transforms]
    assert "RandomGrayscale" in kinds
    jitter = next(s for s in t.transforms if isinstance(s, v2.RandomApply)
                  and isinstance(s.transforms[0], v2.ColorJitter)).transforms[0]
    assert jitter.hue == (-0.1, 0.1) and jitter.saturation == (0.6, 1.4)
    assert t(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)).shape == (3, 28, 28)
