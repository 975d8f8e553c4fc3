"""Colour augmentation drawn on the device: per-sample colour jitter, then random greyscale.

SimCLR's ablation finds colour distortion the most important augmentation on colour images: without it two
views of an image share their colour histogram, and the network can tell images apart by colour alone.

:class:`RandomColor` follows Kornia's ``ColorJitter`` with ``order=(0, 1, 2, 3)`` and then its
``RandomGrayscale`` (``tests/test_color.py`` compares them on the same parameters). With probability
``color_p`` a sample gets, in this order, each clamped to [0, 1]:

1. brightness: ``x * fb``, fb ~ U(1 - b, 1 + b);
2. contrast: ``x * fc + mean(luma(x)) * (1 - fc)``, the mean over the image;
3. saturation: ``x * fs + luma(x) * (1 - fs)``;
4. hue: the hue rotated by U(-h, h) turns (HSV, as Kornia's ``adjust_hue``);

then, with probability ``gray_p``, every channel becomes ``luma(x) = 0.299 R + 0.587 G + 0.114 B``.

Why a fixed order: Kornia and torchvision draw one order per call (the whole batch alike), so a fixed order is
as close to them per batch as any, and it keeps the step free of host decisions (capturable in a CUDA graph).

On one channel, brightness and contrast apply and greyscale is the identity; saturation and hue have no
meaning there and are refused (``ValueError`` here, a one-line ``FastclrError`` before a run starts).

Two implementations of the same steps:

* :func:`jitter_ops`: plain PyTorch ops, every step a few whole-batch passes (any device; the GPU path);
* ``fastclr.kernels.color_jitter`` (CPU, chosen by the Runtime like the other kernels): one C pass per image
  to sum its luma and one to do every step on each pixel in registers.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels, sampling

LUMA = (0.299, 0.587, 0.114)      # ITU-R 601, Kornia's rgb_to_grayscale and PIL's convert("L")


def luma(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) grey values."""
    return x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2]


def packed(params: dict) -> Tensor:
    """``RandomColor.draw``'s dict as the (B, 6) table the kernel reads: jittered (0/1), brightness, contrast,
    saturation, hue (turns), greyscale (0/1)."""
    keys = ("batch_prob", "brightness_factor", "contrast_factor", "saturation_factor", "hue_factor", "gray")
    return torch.stack([params[k].float() for k in keys], -1)


def jitter_ops(x: Tensor, params: dict) -> Tensor:
    """The colour jitter and greyscale as plain PyTorch ops (see the module docstring for the steps).

    Shape: x (B, C, H, W) float in [0, 1], C 1 or 3; params as :meth:`RandomColor.draw` returns them. Output: the
    same shape, in [0, 1]."""
    col = lambda k: params[k].to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    on = params["batch_prob"].view(-1, 1, 1, 1) > 0.5
    y = (x * col("brightness_factor")).clamp_(0.0, 1.0)
    grey = luma(y) if x.shape[1] == 3 else y
    fc = col("contrast_factor")
    y = (y * fc + grey.mean((-2, -1), keepdim=True) * (1 - fc)).clamp_(0.0, 1.0)
    if x.shape[1] == 3:
        fs = col("saturation_factor")
        y = (y * fs + luma(y) * (1 - fs)).clamp_(0.0, 1.0)
        y = shift_hue(y, col("hue_factor"))
    y = torch.where(on, y, x)
    if x.shape[1] == 3:
        y = torch.where(params["gray"].view(-1, 1, 1, 1) > 0.5, luma(y).expand_as(y), y)
    return y


def shift_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the hue of (B, 3, H, W) RGB images in [0, 1] by ``turns`` (B, 1, 1, 1): Kornia's rgb_to_hsv,
    adjust_hue and hsv_to_rgb, with the hue in sextants and the RGB rebuilt as ``v - v s clamp(min(k, 4 - k),
    0, 1)``, k = (n + 6 h) mod 6 for n = 5, 3, 1 (the hsv -> rgb table without its six-way select)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v, mn = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    d = v - mn
    s = torch.where(v == 0, 0.0, d / (v + 1e-8))
    dd = torch.where(d == 0, 1.0, d)
    h = torch.where((r >= g) & (r >= b), g - b, torch.where(g >= b, (b - r) + 2 * dd, (r - g) + 4 * dd))
    t = h / dd / 6 + turns
    six = (t - t.floor()) * 6
    vs = v * s
    k = torch.cat([six + 5, six + 3, six + 1], 1)
    k = torch.where(k >= 6, k - 6, k)
    return v - vs * torch.minimum(k, 4 - k).clamp_(0.0, 1.0)


class RandomColor(nn.Module):
    """Per-sample colour jitter, then random greyscale, drawn on the images' device (module docstring).

    Args:
        factors: (brightness, contrast, saturation, hue) strengths; 0 switches a step off.
        p: probability of the jitter per sample (all four factors or none), Kornia's ``ColorJitter(p=...)``.
        gray_p: probability of greyscale per sample, Kornia's ``RandomGrayscale(p=...)``.
        cpu_kernel: on CPU, run ``fastclr.kernels.color_jitter`` (the same values to float rounding).

    Shape: x (B, C, H, W) float in [0, 1], C 1 or 3 (saturation and hue need 3); output the same shape.
    """

    def __init__(self, factors=(0.4, 0.4, 0.4, 0.1), p: float = 0.8, gray_p: float = 0.2, cpu_kernel: bool = False):
        super().__init__()
        self.factors, self.p, self.gray_p, self.cpu_kernel = tuple(float(f) for f in factors), p, gray_p, cpu_kernel
        b, c, s, h = self.factors
        if not (0 <= b <= 1 and 0 <= c <= 1 and 0 <= s <= 1 and 0 <= h <= 0.5 and 0 <= p <= 1 and 0 <= gray_p <= 1):
            raise ValueError(f"brightness, contrast and saturation must be in [0, 1], hue in [0, 0.5] and the "
                             f"probabilities in [0, 1]; got {self.factors}, p={p}, gray_p={gray_p}")

    def draw(self, b: int, device) -> dict:
        """Kornia's ColorJitter parameters (``fastclr.sampling.color_jitter``) plus ``gray`` (B,) 0/1."""
        return {**sampling.color_jitter(b, self.factors, self.p, device), "gray": sampling.coin(b, self.gray_p, device)}

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"RandomColor takes 1 or 3 channels, got {x.shape[1]}")
        if x.shape[1] == 1 and (self.factors[2] or self.factors[3]):
            raise ValueError("saturation and hue need 3 channels; these images have 1")
        params = self.draw(x.shape[0], x.device) if params is None else params
        if self.cpu_kernel and kernels.color_kernel_supported(x):
            return kernels.color_jitter(x, packed(params))
        return jitter_ops(x, params)
