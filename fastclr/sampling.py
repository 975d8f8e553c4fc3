"""The fused augmentation's random parameters, drawn on the images' device with torch's generator.

Kornia's samplers draw on the CPU unless their module has been moved to the device, and some of them keep
CPU tensors even then (kornia #4426, #4407), so each call does host work and host-to-device copies and cannot
be captured in a CUDA graph. These functions draw the same distributions as Kornia's ``ResizedCropGenerator``,
``AffineGenerator``, ``RectangleEraseGenerator`` and the modules' per-sample ``p`` coin (the blur's sigma is one
:func:`uniform` draw), with ``torch.rand`` on ``device`` and without a
host synchronisation (no ``.item()``, no data-dependent shapes), and return dictionaries in Kornia's own
parameter format, so ``FusedWarp.plan`` and Kornia's modules read them alike. ``tests/test_sampling.py``
compares every parameter with Kornia's sampler (two-sample Kolmogorov-Smirnov tests, 20,000 draws).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _f32(v: float) -> float:
    """v rounded to float32 (Kornia's bounds are float32 tensors; scalars keep the draw free of host copies)."""
    return float(np.float32(v))


def uniform(b: int, lo: float, hi: float, device, shape: tuple[int, ...] = ()) -> Tensor:
    """(B, *shape) float32 draws from U(lo, hi), as ``torch.distributions.Uniform(lo, hi).rsample`` computes
    them with float32 bounds: ``lo + rand * (hi - lo)``, every step rounded to float32 alike."""
    lo, hi = _f32(lo), _f32(hi)
    return torch.rand(b, *shape, device=device) * _f32(hi - lo) + lo


def coin(b: int, p: float, device) -> Tensor:
    """(B,) float32 0/1: 1 with probability p (Kornia's ``batch_prob`` per-sample switch)."""
    return (torch.rand(b, device=device) < p).float()


def resized_crop(b: int, in_size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                 device, tries: int = 10) -> dict:
    """Kornia's RandomResizedCrop boxes: ``{"src": (B, 4, 2)}`` corners (x, y), inclusive, TL TR BR BL.

    As Kornia (and torchvision's get_params): ``tries`` candidates of area ``U(scale) * H * W`` and aspect ratio
    ``exp(U(log ratio))`` per sample, rounded; the first that fits is kept, else the whole image, or, for an
    input whose aspect ratio lies outside ``ratio``, the largest centred box at the nearest ratio in range (as
    torchvision's ``RandomResizedCrop.get_params``); the start is uniform over the positions that fit.
    Candidate selection by ``cumsum`` and ``max`` instead of a loop: the same choice, no host sync."""
    h_in, w_in = in_size
    fall_w, fall_h = _fallback_box(h_in, w_in, ratio)
    area = uniform(b, scale[0], scale[1], device, (tries,)) * (h_in * w_in)
    log_lo, log_hi = float(torch.log(torch.tensor(ratio[0]))), float(torch.log(torch.tensor(ratio[1])))  # float32
    aspect = torch.exp(uniform(b, log_lo, log_hi, device, (tries,)))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= w_in) & (h > 0) & (h <= h_in)
    any_fits, first = ((fits.int().cumsum(1) == 1) & fits).int().max(1)
    any_fits = any_fits.bool()
    w = torch.where(any_fits, w.gather(1, first[:, None])[:, 0], float(fall_w))
    h = torch.where(any_fits, h.gather(1, first[:, None])[:, 0], float(fall_h))
    x0 = (torch.rand(b, device=device) * (w_in - w + 1)).floor()
    y0 = (torch.rand(b, device=device) * (h_in - h + 1)).floor()
    if (fall_w, fall_h) != (w_in, h_in):        # the fallback box is centred (always inside the ratio range)
        x0 = torch.where(any_fits, x0, float((w_in - fall_w) // 2))
        y0 = torch.where(any_fits, y0, float((h_in - fall_h) // 2))
    x1, y1 = x0 + w - 1, y0 + h - 1
    src = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                       torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], -2)
    return {"src": src}


def _fallback_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(width, height) of the crop when no candidate fits: the whole image where its aspect ratio is in range."""
    if w / h < ratio[0]:
        return w, int(round(w / ratio[0]))
    if w / h > ratio[1]:
        return int(round(h * ratio[1])), h
    return w, h


def _symmetric(r) -> tuple[float, float]:
    """Kornia's range convention: a number r means (-r, r), a pair is the range itself."""
    if isinstance(r, (int, float)):
        return (-float(r), float(r))
    lo, hi = (float(v) for v in r)
    return lo, hi


def affine(b: int, size: tuple[int, int], degrees, translate, scale, shear, device) -> dict:
    """Kornia's RandomAffine parameters (``AffineGenerator``, p = 1): angle U(degrees), translations
    U(-t, t) * (W, H) pixels, one isotropic scale U(scale) for both axes, shear_x U(shear) and shear_y 0 for a
    number or a pair (U of the second pair for four numbers), centre ((W - 1) / 2, (H - 1) / 2)."""
    h, w = size
    angle = uniform(b, *_symmetric(degrees), device)
    if scale is not None:
        if len(scale) != 2:
            raise ValueError(f"scale must be a (min, max) pair, got {scale}")
        s = uniform(b, float(scale[0]), float(scale[1]), device)[:, None].expand(b, 2).contiguous()
    else:
        s = torch.ones(b, 2, device=device)
    if translate is not None:
        tx, ty = (float(translate), float(translate)) if isinstance(translate, (int, float)) else translate
        translations = torch.stack([uniform(b, -tx, tx, device) * w, uniform(b, -ty, ty, device) * h], -1)
    else:
        translations = torch.zeros(b, 2, device=device)
    if shear is not None:
        sh = [shear] if isinstance(shear, (int, float)) else list(shear)
        shear_x = uniform(b, *_symmetric(sh[0] if len(sh) == 1 else sh[:2]), device)
        # U(0, 0) for a number or a pair: zeros, but drawn, as Kornia does, so that on the CPU the same seed gives
        # Kornia's parameters bit for bit (and the default runs their earlier results)
        shear_y = uniform(b, *(_symmetric(sh[2:]) if len(sh) == 4 else (0.0, 0.0)), device)
    else:
        shear_x = shear_y = torch.zeros(b, device=device)
    # torch.full, not torch.tensor: a kernel, where a tensor made from Python would be a host-to-device copy
    center = torch.stack([torch.full((b,), w / 2 - 0.5, device=device), torch.full((b,), h / 2 - 0.5, device=device)], -1)
    return {"translations": translations, "center": center, "scale": s, "angle": angle,
            "shear_x": shear_x, "shear_y": shear_y, "batch_prob": torch.ones(b, device=device)}


def erase_boxes(b: int, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                device) -> dict:
    """Kornia's RandomErasing rectangles (``RectangleEraseGenerator``): ``{"xs", "ys", "widths", "heights",
    "values"}``, each (B,) float32 pixels (value 0). Area ``U(scale) * H * W``; aspect ratio U(ratio), or, for a
    range around 1, U(ratio[0], 1) or U(1, ratio[1]) with equal odds; height ``round(sqrt(area * ratio))`` and
    width ``round(sqrt(area / ratio))`` clamped to the image; the corner uniform over the positions that fit."""
    h, w = size
    area = uniform(b, scale[0], scale[1], device) * (h * w)
    if ratio[0] < 1.0 < ratio[1]:
        low, high = uniform(b, ratio[0], 1.0, device), uniform(b, 1.0, ratio[1], device)
        aspect = torch.where(torch.rand(b, device=device).round().bool(), low, high)
    else:
        aspect = uniform(b, ratio[0], ratio[1], device)
    heights = torch.sqrt(area * aspect).round().clamp(1.0, h)
    widths = torch.sqrt(area / aspect).round().clamp(1.0, w)
    xs = (torch.rand(b, device=device) * (w - widths + 1)).floor()
    ys = (torch.rand(b, device=device) * (h - heights + 1)).floor()
    return {"xs": xs, "ys": ys, "widths": widths, "heights": heights, "values": torch.zeros(b, device=device)}


def color_jitter(b: int, factors: tuple[float, float, float, float], p: float, device) -> dict:
    """Kornia's ColorJitter parameters (``ColorJitterGenerator`` and the module's ``p`` coin):
    ``{"brightness_factor", "contrast_factor", "saturation_factor", "hue_factor", "batch_prob"}``, each (B,)
    float32. For strengths (b, c, s, h): brightness, contrast and saturation factors U(max(0, 1 - f), 1 + f),
    hue U(-h, h) in turns of the colour wheel (Kornia's ``ColorJitter`` multiplies it by 2 pi); a strength of 0
    gives the neutral factor (1, or 0 for hue), which skips the step."""
    brightness, contrast, saturation, hue = factors
    around_one = lambda f: uniform(b, max(0.0, 1.0 - f), 1.0 + f, device)  # noqa: E731
    return {"batch_prob": coin(b, p, device), "brightness_factor": around_one(brightness),
            "contrast_factor": around_one(contrast), "saturation_factor": around_one(saturation),
            "hue_factor": uniform(b, -hue, hue, device)}
