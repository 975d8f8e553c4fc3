"""SimCLR's random views, drawn batched on the device with a fresh parameter set per sample.

The tutorial fastclr replaces called torchvision transforms on a whole batch tensor, which draws *one*
crop and rotation for the whole batch. Here every sample draws its own parameters.

One :class:`~fastclr.config.AugConfig` says what is drawn; two implementations draw it
(``SimCLRAugment(impl=...)``), applying the same steps in the same order: stroke thickness, then flip, crop,
affine and elastic warp, then the colour jitter and random greyscale (``fastclr.color``), the additive
brightness/contrast jitter, Gaussian blur and random erasing.

* ``"fused"`` (the default): fastclr's own code. Every parameter is drawn on the images' device
  (``fastclr.sampling``: no host sync, capturable in a CUDA graph), and :class:`~fastclr.warp.FusedWarp`
  folds flip, crop, affine and elastic displacement into ONE sampling grid and calls ``grid_sample`` once.
  Why it is faster: one pass over the images instead of four, no per-sample crop loop, and the elastic
  field's Gaussian blur becomes two small matrix products instead of a 15-tap convolution.
* ``"kornia"`` (the reference): Kornia's modules (:func:`kornia_modules`) one after another, drawing with
  Kornia's samplers: four resamplings, and RandomResizedCrop crops sample by sample.

``tests/test_augment.py`` checks each fused step against Kornia's module on the same parameters, and the
composition against the chain; ``tests/test_sampling.py`` checks the draws against Kornia's samplers.
"""
from __future__ import annotations

import torch
from kornia.filters.kernels import get_gaussian_kernel1d
from torch import Tensor, nn

from . import kernels, sampling
from .color import RandomColor
from .config import AugConfig
from .warp import FusedWarp

ERASE_RATIO = (0.3, 3.3)    # random erasing's aspect-ratio range (Kornia's and torchvision's default)


class SimCLRAugment(nn.Module):
    """Random views of a batch of images, as ``cfg`` says (see the module docstring for the order).

    Args:
        cfg: the augmentation settings (default: ``AugConfig()``, the MNIST recipe).
        size: output (H, W); ``None``: the input's size.
        impl: ``"fused"`` (fastclr's draws and one ``grid_sample``) or ``"kornia"`` (Kornia's modules one after
            another, the reference).
        cpu_kernels: on the CPU, run the fused warp's resampling and the thickness filter with
            ``fastclr.kernels`` (the Runtime decides, see ``fastclr.backend``); the same output as the PyTorch
            ops to float rounding.

    Shape:
        x: (B, C, H, W) float in [0, 1] on any device. Output: (B, C, *size), same dtype and device, in [0, 1].
    """

    def __init__(self, cfg: AugConfig | None = None, size: tuple[int, int] | None = None, impl: str = "fused",
                 cpu_kernels: bool = False):
        super().__init__()
        if impl not in ("fused", "kornia"):
            raise ValueError(f"impl must be 'fused' or 'kornia', got {impl!r}")
        cfg = cfg or AugConfig()
        self.cfg, self.impl = cfg, impl
        ops: list[nn.Module] = [RandomThickness(cfg.thickness_p, cpu_kernels)] if cfg.thickness_p > 0 else []
        if impl == "kornia":
            ref = kornia_modules(cfg, size)
            ops += [ref[k] for k in ("flip", "crop", "affine", "elastic") if k in ref]
        else:
            warp = FusedWarp(cfg, size, cpu_kernel=cpu_kernels)
            ops += [warp] if warp.steps else []
        if impl == "kornia":
            ops += [ref[k] for k in ("color", "gray") if k in ref]
        elif cfg.has_color_jitter or cfg.gray_p > 0:
            ops.append(RandomColor(cfg.color_factors, cfg.color_p if cfg.has_color_jitter else 0.0, cfg.gray_p,
                                   cpu_kernels))
        if cfg.has_jitter:
            ops.append(RandomIntensity(cfg.brightness, cfg.contrast, cfg.jitter_p))
        if impl == "kornia":
            ops += [ref[k] for k in ("blur", "erase") if k in ref]
        else:
            ops += [RandomBlur(cfg.blur_sigma, cfg.blur_p, cpu_kernels)] if cfg.blur_p > 0 else []
            ops += [RandomErase(cfg.erase_scale, cfg.erase_p)] if cfg.erase_p > 0 else []
        self.ops = nn.Sequential(*ops)

    def views_per_call(self, shape) -> int | None:
        """How many views of (C, H, W) ``shape`` a caller should augment per call: :func:`views_per_call`."""
        return views_per_call(self.impl, shape)

    @torch.no_grad()  # views are inputs, not part of the graph: no autograd bookkeeping for the warps
    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self.ops(x.float()) if dtype != torch.float32 else self.ops(x)
        return y.clamp_(0.0, 1.0).to(dtype)


FUSED_BLOCK_PIXELS = 4096 * 28 * 28


def views_per_call(impl: str, shape) -> int | None:
    """Views of (C, H, W) ``shape`` per augmentation call, the one rule DevicePairs and the memory check follow.
    The fused path's cost has a large fixed part (the parameter draws, the warp's small matrices: a few hundred
    small ops), so it takes 4,096 28 x 28 views' worth of pixels a call; Kornia's chain gets slower per view in
    big calls, so it takes one batch at a time (None). ``benchmarks/bench_choices.py`` times both."""
    if impl != "fused":
        return None
    return max(1, FUSED_BLOCK_PIXELS // (int(shape[0]) * int(shape[1]) * int(shape[2])))


def kornia_modules(cfg: AugConfig, size: tuple[int, int] | None = None) -> dict[str, nn.Module]:
    """Kornia's modules for ``cfg``'s steps, by name (flip, crop, affine, elastic, color, gray, blur, erase; those
    that are on): the reference chain (``impl="kornia"``) and the tests' oracle. ``size``: the crop's output (H, W)
    (default 28 x 28, the datasets fastclr reads today)."""
    import kornia.augmentation as K

    mods: dict[str, nn.Module] = {}
    if cfg.hflip_p > 0:
        mods["flip"] = K.RandomHorizontalFlip(p=cfg.hflip_p)
    if cfg.crop_scale is not None:
        mods["crop"] = K.RandomResizedCrop(size or (28, 28), scale=cfg.crop_scale, ratio=tuple(cfg.crop_ratio),
                                           same_on_batch=False)
    if cfg.has_affine:
        mods["affine"] = K.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate),
                                        scale=tuple(cfg.zoom), shear=cfg.shear, same_on_batch=False, p=1.0)
    if cfg.elastic_p > 0:
        k, sigma, alpha = cfg.elastic_kernel, cfg.elastic_sigma, cfg.elastic_alpha
        mods["elastic"] = K.RandomElasticTransform(kernel_size=(k, k), sigma=(sigma, sigma), alpha=(alpha, alpha),
                                                   p=cfg.elastic_p)
    if cfg.has_color_jitter:
        mods["color"] = K.ColorJitter(*cfg.color_factors, p=cfg.color_p, order=(0, 1, 2, 3))
    if cfg.gray_p > 0:
        mods["gray"] = K.RandomGrayscale(p=cfg.gray_p)
    if cfg.blur_p > 0:
        mods["blur"] = K.RandomGaussianBlur((3, 3), sigma=tuple(cfg.blur_sigma), p=cfg.blur_p)
    if cfg.erase_p > 0:
        mods["erase"] = K.RandomErasing(scale=tuple(cfg.erase_scale), ratio=ERASE_RATIO, p=cfg.erase_p)
    return mods


def _max3x3(x: Tensor) -> Tensor:
    """3x3 grey-level dilation (max filter, edges padded with the border value), separable: two passes of
    three shifted maxima, faster than ``max_pool2d(x, 3, stride=1, padding=1)`` (docs/design.md,
    "Measurements behind the code")."""
    r = torch.maximum(x, torch.cat([x[..., :, 1:], x[..., :, -1:]], dim=-1))
    r = torch.maximum(r, torch.cat([x[..., :, :1], x[..., :, :-1]], dim=-1))
    c = torch.maximum(r, torch.cat([r[..., 1:, :], r[..., -1:, :]], dim=-2))
    return torch.maximum(c, torch.cat([r[..., :1, :], r[..., :-1, :]], dim=-2))


class RandomThickness(nn.Module):
    """Per-sample stroke thickness: with probability p a sample is dilated or eroded (equally likely) by a
    3x3 grey-level max / min filter. Whole-batch filters and a select: no per-sample loop. ``cpu_kernel``:
    on CPU, ``fastclr.kernels.thickness`` filters only the chosen samples, in one pass (the same values)."""

    def __init__(self, p: float = 0.5, cpu_kernel: bool = False):
        super().__init__()
        self.p, self.cpu_kernel = p, cpu_kernel

    def forward(self, x: Tensor) -> Tensor:
        u = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
        # one max filter for both: erosion is -dilate(-x), so filter sign * x with sign -1 for the eroded samples
        sign = torch.where(u < self.p / 2, 1.0, -1.0)
        b, c = x.shape[:2]
        flat = x.reshape(b * c, 1, *x.shape[2:])    # the kernel takes one channel: C channels are C samples
        if self.cpu_kernel and kernels.view_kernels_supported(flat):
            chosen = torch.where(u < self.p, sign, 0.0).view(-1)
            return kernels.thickness(flat, chosen.repeat_interleave(c) if c > 1 else chosen).view(x.shape)
        return torch.where(u < self.p, sign * _max3x3(sign * x), x)


class RandomIntensity(nn.Module):
    """Per-sample brightness and contrast jitter, drawn on the images' device: with probability p a sample gets
    a contrast factor c ~ U(1 - contrast, 1 + contrast) and a brightness shift b ~ U(-brightness, brightness),
    y = clip(clip(c x) + b) with clip to [0, 1]: Kornia's ``adjust_contrast`` then ``adjust_brightness``
    (``tests/test_augment.py`` compares them), as two fused elementwise passes instead of four.

    Shape: x (B, C, H, W) float in [0, 1]; output the same shape, in [0, 1].
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, p: float = 0.8):
        super().__init__()
        if not (0 <= brightness <= 1 and 0 <= contrast <= 1 and 0 <= p <= 1):
            raise ValueError(f"brightness and contrast must be in [0, 1] and p in [0, 1], got "
                             f"{brightness}, {contrast}, {p}")
        self.brightness, self.contrast, self.p = brightness, contrast, p

    def draw(self, b: int, device) -> dict:
        """(B,) contrast factors and (B,) brightness shifts; 1 and 0 for the samples left alone."""
        on = torch.rand(b, device=device) < self.p
        c = 1 + self.contrast * (2 * torch.rand(b, device=device) - 1)
        s = self.brightness * (2 * torch.rand(b, device=device) - 1)
        return {"contrast": torch.where(on, c, 1.0), "brightness": torch.where(on, s, 0.0)}

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        params = self.draw(x.shape[0], x.device) if params is None else params
        c = params["contrast"].to(x.dtype).view(-1, 1, 1, 1)
        s = params["brightness"].to(x.dtype).view(-1, 1, 1, 1)
        return (x * c).clamp_(max=1.0).add_(s).clamp_(0.0, 1.0)     # x >= 0 and c >= 0: c x needs no lower clip


class RandomBlur(nn.Module):
    """Per-sample 3x3 Gaussian blur, drawn on the images' device: with probability p a sample is blurred with
    sigma ~ U(sigma) (one sigma for both axes), reflected border; Kornia's RandomGaussianBlur on the same
    parameters (``tests/test_augment.py``).

    Why it is fast: the normalised 3-tap kernel is [k, 1 - 2k, k], so each axis is y = x + k (left + right - 2x)
    with k a (B, 1, 1, 1) weight, a handful of in-place elementwise passes, where Kornia builds B kernels and runs
    a grouped convolution over the chosen samples (4x faster on 4,096 28x28 views, 2 CPU threads). k = 0 for the
    samples not drawn leaves them exactly as they were, so no select is needed.

    ``cpu_kernel``: on CPU, ``fastclr.kernels.blur3`` does both axes in one pass per image, from cache (the same
    values to float rounding; ``benchmarks/bench_augment.py`` times both).

    Shape: x (B, C, H, W) float, H and W >= 2; output the same shape.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 1.0), p: float = 0.5, cpu_kernel: bool = False):
        super().__init__()
        self.sigma, self.p, self.cpu_kernel = tuple(sigma), p, cpu_kernel

    def draw(self, b: int, device) -> dict:
        """``{"sigma": (B,), "batch_prob": (B,)}`` in Kornia's format (1.0 for the samples blurred)."""
        return {"batch_prob": sampling.coin(b, self.p, device), "sigma": sampling.uniform(b, *self.sigma, device)}

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        params = self.draw(x.shape[0], x.device) if params is None else params
        side = get_gaussian_kernel1d(3, params["sigma"].to(x.device, x.dtype)[:, None])[:, 0]   # (B,): k
        k = torch.where(params["batch_prob"].to(x.device).bool(), side, 0.0)
        if self.cpu_kernel and kernels.blur_kernel_supported(x):
            return kernels.blur3(x, k)
        k = k.view(-1, 1, 1, 1)
        return _blur3(_blur3(x, k, -1), k, -2)


def _blur3(x: Tensor, k: Tensor, dim: int) -> Tensor:
    """x + k (left + right - 2x) along ``dim``, reflected at both ends (the neighbour beyond an edge is the
    pixel inside it: left + right = 2 x[1] at the first pixel)."""
    n = x.shape[dim]
    s = torch.empty_like(x)
    s.narrow(dim, 1, n - 2).copy_(x.narrow(dim, 0, n - 2)).add_(x.narrow(dim, 2, n - 2))
    s.narrow(dim, 0, 1).copy_(x.narrow(dim, 1, 1)).mul_(2)
    s.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 2, 1)).mul_(2)
    return s.sub_(x, alpha=2).mul_(k).add_(x)


class RandomErase(nn.Module):
    """Per-sample random erasing, drawn on the images' device: with probability p a rectangle of area
    U(scale) x H x W and aspect ratio in ``ERASE_RATIO`` is set to 0; Kornia's RandomErasing on the same
    parameters (``tests/test_augment.py``). One elementwise pass (a mask from the box edges), no host sync.

    Shape: x (B, C, H, W) float; output the same shape.
    """

    def __init__(self, scale: tuple[float, float] = (0.02, 0.1), p: float = 0.5):
        super().__init__()
        self.scale, self.p = tuple(scale), p

    def draw(self, b: int, size: tuple[int, int], device) -> dict:
        """``{"xs", "ys", "widths", "heights", "batch_prob"}``, each (B,), in Kornia's format."""
        return {"batch_prob": sampling.coin(b, self.p, device),
                **sampling.erase_boxes(b, size, self.scale, ERASE_RATIO, device)}

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        h, w = x.shape[-2:]
        params = self.draw(x.shape[0], (h, w), x.device) if params is None else params
        col = lambda k: params[k].to(x.device, torch.float32).view(-1, 1, 1)
        xx = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w)
        yy = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1)
        inside = ((xx >= col("xs")) & (xx < col("xs") + col("widths"))
                  & (yy >= col("ys")) & (yy < col("ys") + col("heights")) & (col("batch_prob") > 0.5))
        return x.masked_fill(inside[:, None], 0.0)
