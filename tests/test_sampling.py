"""fastclr.sampling draws Kornia's distributions on the images' device: the same parameters bit for bit from the
same seed on the CPU, and two-sample Kolmogorov-Smirnov tests (20,000 independent draws each) that cannot tell
them apart, while the same test rejects a sampler whose range is off by a few percent."""
import kornia.augmentation as K
import pytest
import torch
from scipy.stats import ks_2samp

from fastclr import sampling
from fastclr.augment import SimCLRAugment, kornia_modules
from fastclr.config import AugConfig
from fastclr.warp import FusedWarp

N = 20_000
SHAPE = torch.Size((N, 1, 28, 28))
P_SAME = 1e-3      # same distribution: a p-value below this happens once in 1,000 runs (seeds are fixed here)
P_WRONG = 1e-6     # a range off by a few percent gives p < 1e-10 at N = 20,000


def crop_fields(src):
    return {"x0": src[:, 0, 0], "y0": src[:, 0, 1], "w": src[:, 2, 0] - src[:, 0, 0] + 1,
            "h": src[:, 2, 1] - src[:, 0, 1] + 1}


def affine_fields(p):
    return {"angle": p["angle"], "tx": p["translations"][:, 0], "ty": p["translations"][:, 1],
            "scale": p["scale"][:, 0], "shear_x": p["shear_x"], "shear_y": p["shear_y"]}


def ks(a, b):
    return ks_2samp(a.double().numpy(), b.double().numpy()).pvalue


CROPS = [((0.6, 1.0), (0.75, 1.333)), ((0.08, 1.0), (0.75, 1.333)), ((0.2, 0.5), (0.5, 2.0))]
AFFINES = [dict(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10),
           dict(degrees=(-5, 30), translate=(0.2, 0.05), scale=(0.5, 1.5), shear=(-5, 5, -20, 3))]


@pytest.mark.parametrize("scale, ratio", CROPS)
def test_crop_sampler_matches_kornias(scale, ratio):
    kornia_crop = K.RandomResizedCrop((28, 28), scale=scale, ratio=ratio)
    torch.manual_seed(0)
    theirs = kornia_crop.forward_parameters(SHAPE)["src"]
    torch.manual_seed(0)
    ours = sampling.resized_crop(N, (28, 28), scale, ratio, "cpu")["src"]
    assert torch.equal(ours, theirs.float())                    # same seed on the CPU: the same boxes
    torch.manual_seed(1)
    ours = crop_fields(sampling.resized_crop(N, (28, 28), scale, ratio, "cpu")["src"])
    theirs = crop_fields(theirs)
    for name in ours:
        assert ks(ours[name], theirs[name]) > P_SAME, name
    assert float(ours["x0"].min()) >= 0 and float((ours["x0"] + ours["w"]).max()) <= 28


@pytest.mark.parametrize("cfg", AFFINES)
def test_affine_sampler_matches_kornias(cfg):
    kornia_affine = K.RandomAffine(**cfg, p=1.0)
    torch.manual_seed(0)
    theirs = kornia_affine.forward_parameters(SHAPE)
    torch.manual_seed(0)
    ours = sampling.affine(N, (28, 28), **cfg, device="cpu")
    for key in ours:
        assert torch.equal(ours[key], theirs[key].float()), key
    torch.manual_seed(1)
    ours = affine_fields(sampling.affine(N, (28, 28), **cfg, device="cpu"))
    theirs = affine_fields(theirs)
    for name in ours:
        if float(theirs[name].std()) > 0:
            assert ks(ours[name], theirs[name]) > P_SAME, name
        else:
            assert bool((ours[name] == theirs[name]).all()), name


def test_the_tests_reject_a_slightly_wrong_sampler():
    """The power check: ranges a few percent off are rejected at the same N."""
    torch.manual_seed(0)
    theirs = crop_fields(K.RandomResizedCrop((28, 28), scale=(0.6, 1.0)).forward_parameters(SHAPE)["src"])
    ours = crop_fields(sampling.resized_crop(N, (28, 28), (0.55, 1.0), (0.75, 1.333), "cpu")["src"])
    assert ks(ours["w"], theirs["w"]) < P_WRONG
    kornia_affine = K.RandomAffine(**AFFINES[0], p=1.0)
    theirs = affine_fields(kornia_affine.forward_parameters(SHAPE))
    ours = affine_fields(sampling.affine(N, (28, 28), **{**AFFINES[0], "degrees": 14}, device="cpu"))
    assert ks(ours["angle"], theirs["angle"]) < P_WRONG


def test_coin_is_kornias_per_sample_switch():
    flip = K.RandomHorizontalFlip(p=0.3)
    torch.manual_seed(0)
    theirs = flip.forward_parameters(SHAPE)["batch_prob"]
    torch.manual_seed(0)
    ours = sampling.coin(N, 0.3, "cpu")
    assert torch.equal(ours, theirs.float())
    assert abs(float(ours.mean()) - 0.3) < 4 * (0.3 * 0.7 / N) ** 0.5


@pytest.mark.parametrize("cfg", [AugConfig(), AugConfig(hflip_p=0.5),
                                 AugConfig(crop_min=0.2, degrees=30, translate=0.2, shear=20.0, zoom=(0.7, 1.3))])
def test_the_warps_draws_equal_kornias_samplers_bit_for_bit_on_the_cpu(cfg):
    """On the CPU the device sampler consumes torch's generator exactly as Kornia's samplers do, so seeded runs
    (and every result measured with Kornia's samplers) are unchanged: flip, crop and affine parameters equal."""
    mods = kornia_modules(cfg)
    torch.manual_seed(3)
    ours = FusedWarp(cfg).draw(torch.Size((256, 1, 28, 28)))
    torch.manual_seed(3)
    theirs = {k: mods[k].forward_parameters(torch.Size((256, 1, 28, 28))) for k in ("flip", "crop", "affine")
              if k in mods}
    for step, params in theirs.items():
        for key, value in params.items():
            if key in ours[step]:
                assert torch.equal(ours[step][key].float(), value.float()), (step, key)


def test_every_parameter_is_drawn_on_the_images_device():
    """On the meta device nothing can be read back or copied from the host: every parameter lands there."""
    from fastclr.augment import RandomBlur, RandomErase

    meta = torch.device("meta")
    params = FusedWarp(AugConfig(hflip_p=0.5)).draw(torch.Size((64, 1, 28, 28)), meta)
    params["blur"] = RandomBlur().draw(64, meta)
    params["erase"] = RandomErase().draw(64, (28, 28), meta)
    tensors = [v for group in params.values() for v in group.values()]
    assert len(tensors) > 10 and all(t.device.type == "meta" for t in tensors)


@pytest.mark.parametrize("scale", [(0.02, 0.1), (0.1, 0.4)])
def test_erase_boxes_match_kornias_rectangle_sampler(scale):
    from kornia.augmentation.random_generator import RectangleEraseGenerator

    from fastclr.augment import ERASE_RATIO

    gen = RectangleEraseGenerator(scale, ERASE_RATIO)
    gen.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)
    torch.manual_seed(5)
    theirs = gen(SHAPE)
    torch.manual_seed(6)
    ours = sampling.erase_boxes(N, (28, 28), scale, ERASE_RATIO, "cpu")
    for key in ("xs", "ys", "widths", "heights"):
        assert ks(ours[key], theirs[key]) > P_SAME, key
        assert float(ours[key].min()) >= 0
    assert float((ours["xs"] + ours["widths"]).max()) <= 28 and float((ours["ys"] + ours["heights"]).max()) <= 28
    # the test has power: boxes from a 10% larger area range are told apart
    wrong = sampling.erase_boxes(N, (28, 28), (scale[0] * 1.1, scale[1] * 1.1), ERASE_RATIO, "cpu")
    assert ks(wrong["widths"] * wrong["heights"], theirs["widths"] * theirs["heights"]) < P_WRONG


def test_blur_sigma_matches_kornias_sampler():
    from fastclr.augment import RandomBlur

    blur = K.RandomGaussianBlur((3, 3), sigma=(0.1, 1.0), p=1.0)
    torch.manual_seed(7)
    theirs = blur.forward_parameters(SHAPE)["sigma"]
    torch.manual_seed(8)
    ours = RandomBlur((0.1, 1.0), p=1.0).draw(N, "cpu")["sigma"]
    assert ks(ours, theirs) > P_SAME
    assert ks(ours * 1.05, theirs) < P_WRONG


@pytest.mark.gpu
def test_fused_augmentation_captures_in_a_cuda_graph_and_makes_no_host_sync():
    """On CUDA the whole fused augmentation (device sampling, plan, warp, jitter, blur, erasing) runs without a synchronising
    op, and a CUDA graph captures it: a capture fails on any host sync or host-to-device copy. Replays draw
    fresh parameters (the graph advances the generator's offset), so two replays differ."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    aug = SimCLRAugment(AugConfig(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.5, erase_p=0.5))
    x = torch.rand(512, 1, 28, 28, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        aug(x)                                           # warm-up: constants and factors made once per device
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = aug(x)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize("hw", [(28, 56), (64, 16), (5, 40)])
def test_crop_of_an_image_outside_the_ratio_range_falls_back_to_a_centred_box(hw):
    """Where no candidate fits (the aspect ratio of a 1 x 8 strip lies outside (3/4, 4/3)), the box is the
    largest centred one at the nearest ratio in range, as torchvision's fallback; every box lies in the image."""
    h, w = hw
    torch.manual_seed(0)
    src = sampling.resized_crop(4000, hw, (0.9, 1.0), (0.75, 1.333), "cpu")["src"]
    x0, y0, x1, y1 = src[:, 0, 0], src[:, 0, 1], src[:, 2, 0], src[:, 2, 1]
    assert float(x0.min()) >= 0 and float(y0.min()) >= 0 and float(x1.max()) <= w - 1 and float(y1.max()) <= h - 1
    ratio = (x1 - x0 + 1) / (y1 - y0 + 1)
    assert float(ratio.min()) >= 0.75 - 2 / min(hw) and float(ratio.max()) <= 1.333 + 2 / min(hw)
