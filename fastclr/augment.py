"""Batched SimCLR augmentation on the device with Kornia, a fresh random parameter set per sample.

The tutorial fastclr replaces called torchvision transforms on a whole batch tensor, which draws *one*
crop and rotation for the whole batch. Kornia draws parameters per sample (``same_on_batch=False``) and
warps the batch in one call, so the cost per image falls with the batch size, on CPU or GPU.
"""
from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn


class SimCLRAugment(nn.Module):
    """Random view generator for 1-channel 28x28 images (digits, clothing).

    Defaults are tuned for MNIST (see README, "Recipe"): digits survive a mild crop and a small rotation;
    large rotations turn 6 into 9 and flips turn 2 into 5, so neither is used.

    Args:
        size: output (H, W).
        crop_scale: RandomResizedCrop area range; ``None`` switches the crop off.
        crop_ratio: RandomResizedCrop aspect-ratio range.
        degrees: rotation range +-degrees.
        translate: translation as a fraction of the size, both axes.
        scale: extra zoom range of the affine.
        shear: shear range +-degrees.
        erase_p: probability of a random erasing patch (0 switches it off).
        blur_p: probability of a Gaussian blur (0 switches it off).

    Shape:
        x: (B, C, H, W) float in [0, 1] on any device. Output: the same shape, dtype and device, in [0, 1].
    """

    def __init__(self, size: tuple[int, int] = (28, 28), crop_scale: tuple[float, float] | None = (0.6, 1.0),
                 crop_ratio: tuple[float, float] = (0.75, 1.333), degrees: float = 15.0, translate: float = 0.1,
                 scale: tuple[float, float] = (0.9, 1.1), shear: float = 10.0, erase_p: float = 0.0,
                 blur_p: float = 0.0):
        super().__init__()
        ops: list[nn.Module] = []
        if crop_scale is not None:
            ops.append(K.RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio, same_on_batch=False))
        if degrees or translate or shear or scale != (1.0, 1.0):
            ops.append(K.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale,
                                      shear=shear, same_on_batch=False, p=1.0))
        if blur_p > 0:
            ops.append(K.RandomGaussianBlur((3, 3), sigma=(0.1, 1.0), p=blur_p))
        if erase_p > 0:
            ops.append(K.RandomErasing(scale=(0.02, 0.1), p=erase_p))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()  # views are inputs, not part of the graph: no autograd bookkeeping for the warps
    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        y = self.ops(x.float()) if dtype != torch.float32 else self.ops(x)
        return y.clamp_(0.0, 1.0).to(dtype)


def tutorial_batch_augment(x: Tensor) -> tuple[Tensor, Tensor]:
    """The tutorial's augmentation, for benchmarks only: one crop and one rotation for the whole batch."""
    from torchvision import transforms

    return (transforms.RandomResizedCrop(28, scale=(0.8, 1.0))(x), transforms.RandomRotation(10)(x))
