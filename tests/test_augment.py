import pytest
import torch

from conftest import only

from fastclr.augment import SimCLRAugment
from fastclr.config import AugConfig

# fp32 rounding between the fused warp and Kornia's warps. With torch 2.11 and 2.14.1 they agree to 1e-5; torch 2.5.1
# (the lowest torch fastclr supports) rounds Kornia's warp differently on ~1% of the pixels, up to 4.0e-5
# (docs/versions.md). A wrong rotation sign or crop box is off by 0.1-0.8, so either bound catches real errors.
KORNIA_ATOL = 1e-5 if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6) else 5e-5


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
    aug = SimCLRAugment(AugConfig(erase_p=0.5, blur_p=0.5))
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
    y = SimCLRAugment(AugConfig(erase_p=0.5, blur_p=0.5))(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_switches_turn_ops_off():
    x = digit_like(4)
    ident = SimCLRAugment(only())
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
    y = SimCLRAugment(AugConfig(elastic_p=1.0, thickness_p=0.5))(digit_like(8))
    assert y.shape == (8, 1, 28, 28) and float(y.min()) >= 0 and float(y.max()) <= 1


def test_separable_max_filter_equals_max_pool():
    import torch.nn.functional as F

    from fastclr.augment import _max3x3

    x = torch.rand(6, 1, 28, 28)
    torch.testing.assert_close(_max3x3(x), F.max_pool2d(x, 3, stride=1, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(-_max3x3(-x), -F.max_pool2d(-x, 3, stride=1, padding=1), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the fused warp against Kornia
# FusedWarp takes the per-sample parameters Kornia's modules draw and samples the image once. Each step alone
# must reproduce Kornia's own output for the same parameters (same bilinear sample positions: fp32 rounding
# only, atol 1e-5); the three together must match Kornia's chain of three resamplings on smooth images.

def smooth_digits(n, seed=0):
    """Blurry blobs (sigma 3 px) at random places inside the central 16x16: smooth, zero at the border."""
    g = torch.Generator().manual_seed(seed)
    c = 6 + 16 * torch.rand(n, 2, generator=g)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    d2 = (xx - c[:, None, None, 0]) ** 2 + (yy - c[:, None, None, 1]) ** 2
    return torch.exp(-d2 / (2 * 3.0 ** 2))[:, None]


def kornia_modules():
    """Kornia's crop, affine and elastic modules for the default AugConfig (the reference)."""
    from fastclr.augment import kornia_modules as reference

    mods = reference(AugConfig())
    return mods["crop"], mods["affine"], mods["elastic"]


def test_fused_crop_alone_equals_kornia_inside_the_border():
    from fastclr.warp import FusedWarp

    torch.manual_seed(0)
    crop, _, _ = kornia_modules()
    x = torch.rand(32, 1, 28, 28)
    params = {"crop": crop.forward_parameters(x.shape)}
    ours = FusedWarp(only("crop"))(x, params)
    ref = crop(x, params=params["crop"])
    # Kornia resizes the sliced crop, so its first and last output rows/columns clamp to the crop's edge pixel;
    # the fused warp reads the real neighbour there. Everywhere else the sample positions are the same.
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_fused_affine_alone_equals_kornia():
    from fastclr.warp import FusedWarp

    torch.manual_seed(1)
    _, affine, _ = kornia_modules()
    x = torch.rand(32, 1, 28, 28)
    params = {"affine": affine.forward_parameters(x.shape)}
    torch.testing.assert_close(FusedWarp(only("affine"))(x, params),
                               affine(x, params=params["affine"]), rtol=0, atol=KORNIA_ATOL)


def test_fused_elastic_alone_with_kornias_noise_equals_kornia():
    from fastclr.warp import FusedWarp

    torch.manual_seed(2)
    _, _, elastic = kornia_modules()
    x = torch.rand(32, 1, 28, 28)
    params = {"elastic": elastic.forward_parameters(x.shape)}     # Kornia's own noise: the exact blur path
    assert 0 < int(params["elastic"]["batch_prob"].sum()) < 32      # p=0.8: some on, some off
    torch.testing.assert_close(FusedWarp(only("elastic"))(x, params),
                               elastic(x, params=params["elastic"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_composition_matches_kornias_chain_on_smooth_images(seed):
    """One resampling against three. Where the chain never padded (a chain run on an all-ones image marks
    those pixels, ~80% of them), on sigma-3 blobs of height 1 only the chain's two extra bilinear
    interpolations differ (each up to ~h^2 f''/8 ~ 0.014 at the peak): measured max 0.048, mean 0.0018. Over
    all pixels the frames' padding is reproduced too: mean 0.0017; the max (0.16) sits where a frame edge cuts
    a blob and the chain interpolates that hard edge once more. The rotation drawn with the wrong sign gives
    max errors of 0.67-0.84."""
    from fastclr.warp import FusedWarp

    torch.manual_seed(seed)
    crop, affine, elastic = kornia_modules()
    x = smooth_digits(64, seed)
    params = {"crop": crop.forward_parameters(x.shape), "affine": affine.forward_parameters(x.shape),
              "elastic": elastic.forward_parameters(x.shape)}

    def chain(img):
        return elastic(affine(crop(img, params=params["crop"]), params=params["affine"]), params=params["elastic"])

    ours, ref = FusedWarp(only("crop", "affine", "elastic"))(x, params), chain(x)
    unpadded = chain(torch.ones_like(x)) > 0.999
    assert float(unpadded.float().mean()) > 0.5                       # most of each view is compared
    diff = (ours - ref).abs()
    assert float(diff[unpadded].max()) < 0.08 and float(diff[unpadded].mean()) < 0.003
    assert float(diff.max()) < 0.25 and float(diff.mean()) < 0.003


@pytest.mark.parametrize("steps", [("crop", "affine"), ("crop", "elastic")])
def test_fused_warp_blackens_the_crops_frame_like_the_chain(steps):
    """Kornia's affine (or elastic) step reads the *cropped* image and pads it with zeros. On a constant
    image the fused warp's frame weight must give exactly the chain's output (fp32 rounding, atol 1e-5),
    including where the crop box touches the image border (no double darkening)."""
    from fastclr.warp import FusedWarp

    torch.manual_seed(4)
    mods = dict(zip(("crop", "affine", "elastic"), kornia_modules()))
    x = torch.ones(64, 1, 28, 28)
    params = {k: mods[k].forward_parameters(x.shape) for k in steps}
    ref = x
    for k in steps:
        ref = mods[k](ref, params=params[k])
    assert float(ref.min()) < 0.5                                       # the chain did pad
    ours = FusedWarp(only(*steps))(x, params)
    torch.testing.assert_close(ours, ref, rtol=0, atol=KORNIA_ATOL)


def test_low_rank_elastic_field_has_the_exact_fields_covariance():
    """The drawn field's covariance per axis is L L^T, against Kornia's B B^T / 3 for uniform noise (B: the
    blur matrix). Rank 8 keeps >= 99.5% of the variance of the 2-D field, and fields drawn from it have the
    per-pixel standard deviation the exact covariance predicts (within 5% at 4,000 draws)."""
    from fastclr.warp import FusedWarp, _blur_matrix

    _, _, elastic = kornia_modules()
    warp = FusedWarp(only("elastic"))
    exact = _blur_matrix(28, 15, 4.0, "cpu").double()
    exact = exact @ exact.T
    low = warp._factor(28, 15, 4.0, 8, "cpu").double()
    low = low @ low.T
    kept = (torch.trace(low) / torch.trace(exact)) ** 2               # the 2-D field: a Kronecker product
    assert kept >= 0.995
    assert float(torch.linalg.matrix_norm(low - exact) / torch.linalg.matrix_norm(exact)) < 0.01

    torch.manual_seed(0)
    params = warp.draw(torch.Size((4000, 1, 28, 28)))["elastic"]
    ly, lx, coeffs = warp.low_rank_field(params, 28, 28, "cpu")
    fields = ly @ coeffs @ lx.T                                        # (4000, 2, 28, 28)
    predicted = (torch.diagonal(exact)[:, None] * torch.diagonal(exact)[None, :] / 3).sqrt().float()
    ratio = fields.std(0) / predicted
    assert 0.95 < float(ratio.mean()) < 1.05 and float(ratio.min()) > 0.85
    assert abs(float(params["batch_prob"].float().mean()) - 0.8) < 0.03


@pytest.mark.parametrize("impl", ["fused", "kornia"])
def test_both_implementations_keep_digits_recognisable(impl):
    """Same parameter ranges, so the views move the image's centre of mass by similar amounts."""
    torch.manual_seed(0)
    x = smooth_digits(256)
    y = SimCLRAugment(AugConfig(thickness_p=0), impl=impl)(x)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def centre(img):
        m = img.sum((1, 2, 3))
        return torch.stack([(img[:, 0] * xx).sum((1, 2)) / m, (img[:, 0] * yy).sum((1, 2)) / m], 1)

    shift = (centre(y) - centre(x)).norm(dim=1)
    assert 0.5 < float(shift.mean()) < 3.5       # they move (crop, translate), but by pixels, not across


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="fused"):
        SimCLRAugment(impl="opencv")


def test_random_thickness_uses_exactly_dilation_or_erosion():
    from fastclr.augment import RandomThickness, _max3x3

    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = RandomThickness(p=1.0)(x)
    dil, ero = _max3x3(x), -_max3x3(-x)
    is_dil = (y == dil).flatten(1).all(1)
    is_ero = (y == ero).flatten(1).all(1)
    assert bool((is_dil | is_ero).all()) and int(is_dil.sum()) > 10 and int(is_ero.sum()) > 10


def test_elastic_rank_none_draws_kornias_per_pixel_noise():
    from fastclr.warp import FusedWarp

    params = FusedWarp(only("elastic"), elastic_rank=None).draw(torch.Size((4, 1, 28, 28)))
    assert params["elastic"]["noise"].shape == (4, 2, 28, 28)
    low = FusedWarp(only("elastic")).draw(torch.Size((4, 1, 28, 28)))
    assert low["elastic"]["coeffs"].shape == (4, 2, 8, 8)


# ----------------------------------------------------------------------- clothing augmentations (flip, jitter, blur)

CLOTHING = dict(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.3)


def test_fused_flip_with_affine_equals_kornias_flip_then_affine():
    """The flip is folded into the warp's matrix; Kornia flips the pixels, then warps."""
    import kornia.augmentation as K

    from fastclr.warp import FusedWarp

    torch.manual_seed(5)
    flip, (_, affine, _) = K.RandomHorizontalFlip(p=0.5), kornia_modules()
    x = torch.rand(32, 1, 28, 28)
    params = {"flip": flip.forward_parameters(x.shape), "affine": affine.forward_parameters(x.shape)}
    assert 0 < int(params["flip"]["batch_prob"].sum()) < 32              # some flipped, some not
    ours = FusedWarp(only("flip", "affine"))(x, params)
    ref = affine(flip(x, params=params["flip"]), params=params["affine"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=KORNIA_ATOL)
    alone = FusedWarp(only("flip"))(x, {"flip": params["flip"]})
    torch.testing.assert_close(alone, flip(x, params=params["flip"]), rtol=0, atol=1e-5)


def test_fused_flip_then_crop_reads_the_crop_box_in_the_flipped_image():
    """Kornia flips first, then crops its box out of the flipped image. Inside the border (see the crop-alone
    test) the one resampling equals the chain to fp32 rounding; on a constant image flip, crop and affine
    together also reproduce the chain's black frames exactly."""
    import kornia.augmentation as K

    from fastclr.warp import FusedWarp

    torch.manual_seed(6)
    flip, (crop, affine, _) = K.RandomHorizontalFlip(p=0.5), kornia_modules()
    x = torch.rand(64, 1, 28, 28)
    params = {"flip": flip.forward_parameters(x.shape), "crop": crop.forward_parameters(x.shape)}
    ref = crop(flip(x, params=params["flip"]), params=params["crop"])
    ours = FusedWarp(only("flip", "crop"))(x, params)
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-5)

    ones = torch.ones_like(x)
    params["affine"] = affine.forward_parameters(x.shape)
    ref = affine(crop(flip(ones, params=params["flip"]), params=params["crop"]), params=params["affine"])
    assert float(ref.min()) < 0.5                                       # the chain did pad
    ours = FusedWarp(only("flip", "crop", "affine"))(ones, params)
    torch.testing.assert_close(ours, ref, rtol=0, atol=KORNIA_ATOL)


def test_random_intensity_equals_kornias_contrast_then_brightness():
    from kornia.enhance import adjust_brightness, adjust_contrast

    from fastclr.augment import RandomIntensity

    torch.manual_seed(7)
    x = torch.rand(64, 1, 28, 28)
    jitter = RandomIntensity(brightness=0.3, contrast=0.5, p=0.8)
    params = jitter.draw(64, x.device)
    on = params["contrast"] != 1
    assert 30 < int(on.sum()) < 64 and bool((params["brightness"][~on] == 0).all())
    assert float(params["contrast"].min()) >= 0.5 and float(params["contrast"].max()) <= 1.5
    assert float(params["brightness"].abs().max()) <= 0.3
    ref = adjust_brightness(adjust_contrast(x, params["contrast"]), params["brightness"])
    torch.testing.assert_close(jitter(x.clone(), params), ref, rtol=0, atol=1e-6)


def test_random_intensity_rejects_ranges_that_leave_zero_one():
    from fastclr.augment import RandomIntensity

    with pytest.raises(ValueError, match="contrast"):
        RandomIntensity(contrast=1.5)


@pytest.mark.parametrize("impl", ["fused", "kornia"])
def test_clothing_augmentations_are_per_sample_seeded_and_in_range(impl):
    aug = SimCLRAugment(AugConfig(**CLOTHING), impl=impl)
    x = digit_like(1).repeat(64, 1, 1, 1)
    torch.manual_seed(11)
    a, b = aug(x), aug(x)
    torch.manual_seed(11)
    torch.testing.assert_close(aug(x), a, rtol=0, atol=0)
    assert not torch.equal(a, b)
    assert len({tuple(v.flatten().mul(1000).round().int().tolist()) for v in a}) >= 60
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    # flips happen: the bar across the stroke (columns 8-19, off-centre) lands on either side
    mass_left = a[..., :, :14].sum((1, 2, 3)) / a.sum((1, 2, 3))
    assert float(mass_left.min()) < 0.5 < float(mass_left.max())


def test_fused_flip_uses_the_cpu_kernel_path_too():
    from fastclr import kernels

    if not kernels.available():
        pytest.skip("no C compiler: the CPU kernels are not built")
    x = torch.rand(32, 1, 28, 28)
    torch.manual_seed(3)
    ref = SimCLRAugment(AugConfig(hflip_p=0.5, thickness_p=0))(x)
    torch.manual_seed(3)
    ours = SimCLRAugment(AugConfig(hflip_p=0.5, thickness_p=0), cpu_kernels=True)(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fused_augmentation_compiles_as_one_graph_and_equals_eager():
    """torch.compile(fullgraph=True) fails on any graph break, host sync (.item(), a data-dependent branch) or
    Python-side randomness, so this proves the fused augmentation (device sampling, warp, thickness, flip,
    jitter, blur and erasing) is one traceable graph, as CUDA-graph capture needs. With Inductor's
    fallback_random the compiled call draws the eager random stream, so the views must agree to fp32 rounding
    (atol 1e-5)."""
    import torch._inductor.config as inductor_config

    aug = SimCLRAugment(AugConfig(**CLOTHING, erase_p=0.5))
    x = torch.rand(64, 1, 28, 28)
    compiled = torch.compile(aug, fullgraph=True)
    with inductor_config.patch(fallback_random=True):
        for seed in (0, 5):
            torch.manual_seed(seed)
            ours = compiled(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(ours, aug(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------- fastclr's own affine matrix, blur, erasing

@pytest.mark.parametrize("degrees, shear", [(15.0, 10.0), (90.0, (-5.0, 20.0, -3.0, 7.0)), (0.0, 0.0)])
def test_affine_matrix_equals_kornias_bit_for_bit(degrees, shear):
    """fastclr.warp.affine_matrix runs Kornia's get_affine_matrix2d's operations in its order: torch.equal."""
    import kornia.augmentation as K

    from fastclr.warp import affine_matrix

    torch.manual_seed(8)
    kornia_affine = K.RandomAffine(degrees=degrees, translate=(0.2, 0.1), scale=(0.7, 1.3), shear=shear, p=1.0)
    x = torch.rand(64, 1, 28, 28)
    params = kornia_affine.forward_parameters(x.shape)
    theirs = kornia_affine.compute_transformation(x, params, kornia_affine.flags)
    assert torch.equal(affine_matrix({k: v.float() for k, v in params.items()}), theirs)


def test_blur_equals_kornias_gaussian_blur_on_the_same_sigmas():
    """RandomBlur's separable taps against kornia.filters.gaussian_blur2d (what RandomGaussianBlur calls) on the
    same per-sample sigma, reflected border: fp32 rounding (atol 1e-6); the samples not drawn stay as they were."""
    from kornia.filters import gaussian_blur2d

    from fastclr.augment import RandomBlur

    torch.manual_seed(9)
    x = torch.rand(48, 2, 20, 28)
    blur = RandomBlur((0.1, 2.0), p=0.6)
    params = blur.draw(48, x.device)
    on = params["batch_prob"].bool()
    assert 10 < int(on.sum()) < 45
    ref = gaussian_blur2d(x, (3, 3), params["sigma"][:, None].expand(-1, 2), border_type="reflect")
    out = blur(x, params)
    torch.testing.assert_close(out[on], ref[on], rtol=0, atol=1e-6)
    assert torch.equal(out[~on], x[~on])


def test_erase_equals_kornias_random_erasing_on_the_same_boxes():
    """RandomErase's mask against Kornia's RandomErasing applied with the same rectangles: exact."""
    import kornia.augmentation as K

    from fastclr.augment import ERASE_RATIO, RandomErase

    torch.manual_seed(10)
    x = torch.rand(64, 1, 28, 28) + 0.1
    erase = RandomErase((0.02, 0.3), p=1.0)
    params = erase.draw(64, (28, 28), x.device)
    ref = K.RandomErasing(scale=(0.02, 0.3), ratio=ERASE_RATIO, p=1.0)(x, params=params)
    out = erase(x, params)
    assert torch.equal(out, ref)
    assert bool(((out == 0).flatten(1).sum(1) > 0).all())                 # every sample lost a rectangle
    params["batch_prob"] = torch.zeros(64)
    assert torch.equal(erase(x, params), x)


def test_kornia_reference_chain_is_built_from_the_same_config():
    """impl="kornia" builds Kornia's modules from the AugConfig, in the fused path's order."""
    import kornia.augmentation as K

    cfg = AugConfig(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.5, erase_p=0.5, crop_ratio=(0.5, 2.0),
                    zoom=(0.8, 1.2), elastic_sigma=3.0)
    ops = list(SimCLRAugment(cfg, impl="kornia").ops)
    kinds = [type(m).__name__ for m in ops]
    assert kinds == ["RandomThickness", "RandomHorizontalFlip", "RandomResizedCrop", "RandomAffine",
                     "RandomElasticTransform", "RandomIntensity", "RandomGaussianBlur", "RandomErasing"]
    crop, affine, elastic = ops[2], ops[3], ops[4]
    assert isinstance(crop, K.RandomResizedCrop)
    assert tuple(float(v) for v in crop._param_generator.ratio) == (0.5, 2.0)
    assert tuple(float(v) for v in affine._param_generator.scale) == pytest.approx((0.8, 1.2))
    assert tuple(elastic.flags["sigma"]) == (3.0, 3.0)
    fused = [type(m).__name__ for m in SimCLRAugment(cfg).ops]
    assert fused == ["RandomThickness", "FusedWarp", "RandomIntensity", "RandomBlur", "RandomErase"]


@pytest.mark.parametrize("impl", ["fused", "kornia"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 20, 36), (3, 96, 96)])
def test_augmentation_takes_any_channels_and_size(impl, shape):
    """Every step (flip, crop, affine, elastic, thickness, jitter, blur, erasing) on C x H x W views: the same
    shape back, in [0, 1], a fresh view per sample."""
    cfg = AugConfig(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.5, erase_p=0.5)
    x = torch.rand(16, *shape)
    torch.manual_seed(0)
    y = SimCLRAugment(cfg, impl=impl)(x) if impl == "fused" else SimCLRAugment(cfg, shape[1:], impl=impl)(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert len({tuple(v.flatten()[:64].mul(1000).round().int().tolist()) for v in y}) == 16
