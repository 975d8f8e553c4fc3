"""Batched SimCLR augmentation on the device with Kornia, a fresh random parameter set per sample.

The tutorial fastclr replaces called torchvision transforms on a whole batch tensor, which draws *one*
crop and rotation for the whole batch. Kornia draws parameters per sample (``same_on_batch=False``).

Two implementations of the same random views (``SimCLRAugment(impl=...)``):

* ``"kornia"`` (the reference): Kornia's RandomResizedCrop, RandomAffine and RandomElasticTransform
  one after another; three resamplings of the batch, and RandomResizedCrop crops sample by sample.
* ``"fused"`` (the default): the same Kornia modules draw the same per-sample parameters, then
  :class:`FusedWarp` folds crop, affine and elastic displacement into ONE sampling grid and calls
  ``grid_sample`` once. Why it is faster: one pass over the images instead of three, no per-sample
  crop loop, and the elastic field's Gaussian blur (constant border) becomes two small matrix
  products instead of a 15-tap convolution. ``tests/test_augment.py`` checks each part against
  Kornia's own output for the same parameters, and the composition against the chain.
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from . import kernels
from .warp import FusedWarp


class SimCLRAugment(nn.Module):
    """Random view generator for 1-channel 28x28 images (digits, clothing).

    Defaults are tuned for MNIST (README, "Recipe"): a mild crop and a small rotation, plus the two
    augmentations that fit handwriting best. One run each, 1 epoch, k-NN: 0.9760 without them, 0.9780 with
    thickness (p 0.5), 0.9798 with thickness and elastic (p 0.5), 0.9822 with elastic at p 0.8. Large rotations turn 6 into 9 and flips turn 2
    into 5, so neither is used; random erasing and stronger crops lowered the accuracy.

    Args:
        size: output (H, W).
        crop_scale: RandomResizedCrop area range; ``None`` switches the crop off.
        crop_ratio: RandomResizedCrop aspect-ratio range.
        degrees: rotation range +-degrees.
        translate: translation as a fraction of the size, both axes.
        scale: extra zoom range of the affine.
        shear: shear range +-degrees.
        erase_p: probability of a random erasing patch (0 switches it off).
        hflip_p: probability of a horizontal flip (0 switches it off). Clothing is left-right symmetric; digits
            are not. The fused path folds it into the warp's grid, so it costs no pass over the images.
        brightness, contrast: per-sample intensity jitter (:class:`RandomIntensity`) with probability
            ``jitter_p``: a contrast factor in [1 - contrast, 1 + contrast] and a brightness shift in
            [-brightness, brightness] (0 and 0 switch it off).
        jitter_p: probability of the intensity jitter per sample.
        blur_p: probability of a Gaussian blur (Kornia's RandomGaussianBlur, 3x3, sigma 0.1-1 per sample; 0
            switches it off).
        thickness_p: probability of a stroke-thickness change: half of those samples are dilated, half eroded
            (3x3 grey-level morphology); handwriting varies most in pen width.
        elastic_p: probability of a Kornia elastic deformation (Simard et al. 2003's digit augmentation).
        impl: ``"fused"`` (one ``grid_sample`` for crop + affine + elastic) or ``"kornia"`` (Kornia's modules
            one after another, the reference); both draw their parameters from the same Kornia modules.
        cpu_kernels: on CPU, run the fused warp's resampling with ``fastclr.kernels.warp_sample`` (the Runtime
            decides, see ``fastclr.backend``); the same output as the PyTorch ops to float rounding.

    Shape:
        x: (B, C, H, W) float in [0, 1] on any device. Output: (B, C, *size), same dtype and device, in [0, 1].
    """

    def __init__(self, size: tuple[int, int] = (28, 28), crop_scale: tuple[float, float] | None = (0.6, 1.0),
                 crop_ratio: tuple[float, float] = (0.75, 1.333), degrees: float = 15.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), shear: float = 10.0, erase_p: float = 0.0,
                 blur_p: float = 0.0, thickness_p: float = 0.5, elastic_p: float = 0.8, impl: str = "fused",
                 cpu_kernels: bool = False, hflip_p: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                 jitter_p: float = 0.8):
        super().__init__()
        if impl not in ("fused", "kornia"):
            raise ValueError(f"impl must be 'fused' or 'kornia', got {impl!r}")
        self.impl = impl
        crop = K.RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio, same_on_batch=False) \
            if crop_scale is not None else None
        affine = K.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale, shear=shear,
                                same_on_batch=False, p=1.0) \
            if degrees or translate or shear or scale != (1.0, 1.0) else None
        elastic = K.RandomElasticTransform(kernel_size=(15, 15), sigma=(4.0, 4.0), alpha=(0.5, 0.5), p=elastic_p) \
            if elastic_p > 0 else None
        flip = K.RandomHorizontalFlip(p=hflip_p) if hflip_p > 0 else None
        geometric = [m for m in (flip, crop, affine, elastic) if m is not None]
        ops: list[nn.Module] = [RandomThickness(thickness_p, cpu_kernels)] if thickness_p > 0 else []
        if impl == "fused" and geometric:
            ops.append(FusedWarp(crop, affine, elastic, size, cpu_kernel=cpu_kernels, flip=flip))
        else:
            ops.extend(geometric)
        if (brightness > 0 or contrast > 0) and jitter_p > 0:
            ops.append(RandomIntensity(brightness, contrast, jitter_p))
        if blur_p > 0:
            ops.append(K.RandomGaussianBlur((3, 3), sigma=(0.1, 1.0), p=blur_p))
        if erase_p > 0:
            ops.append(K.RandomErasing(scale=(0.02, 0.1), p=erase_p))
        self.ops = nn.Sequential(*ops)

    @property
    def views_per_call(self) -> int | None:
        """How many views a caller should augment per call (DevicePairs follows it). The fused warp's cost has a
        large fixed part (Kornia's parameter draws, the warp's small matrices), so big calls pay off; Kornia's
        chain gets slower per view in big calls, so it takes one batch at a time (None). Timings:
        docs/design.md, "Measurements behind the code"."""
        return 4096 if self.impl == "fused" else None

    @torch.no_grad()  # views are inputs, not part of the graph: no autograd bookkeeping for the warps
    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self.ops(x.float()) if dtype != torch.float32 else self.ops(x)
        return y.clamp_(0.0, 1.0).to(dtype)


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
        if self.cpu_kernel and kernels.view_kernels_supported(x):
            return kernels.thickness(x, torch.where(u < self.p, sign, 0.0).view(-1))
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


def tutorial_batch_augment(x: Tensor) -> tuple[Tensor, Tensor]:
    """The tutorial's augmentation, for benchmarks only: one crop and one rotation for the whole batch."""
    from torchvision import transforms

    return (transforms.RandomResizedCrop(28, scale=(0.8, 1.0))(x), transforms.RandomRotation(10)(x))
