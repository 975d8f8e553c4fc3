"""FusedWarp: a random flip, resized crop, affine and elastic deformation as ONE resampling of the batch.

:meth:`FusedWarp.draw` draws every sample's parameters on the images' device (``fastclr.sampling``, from an
:class:`~fastclr.config.AugConfig`), in Kornia's parameter format, so Kornia's modules (the reference,
``fastclr.augment.kornia_modules``) and this warp read the same parameters alike. :meth:`FusedWarp.plan` turns
them into small per-sample matrices (a :class:`WarpPlan`), with the affine matrix from :func:`affine_matrix`
(fastclr's own, equal to Kornia's), and the forward resamples once, with PyTorch ops or, on the CPU,
``fastclr.kernels.warp_sample``. ``tests/test_augment.py`` checks each part against Kornia's own output for
the same parameters.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from kornia.filters.kernels import get_gaussian_kernel1d
from torch import Tensor, nn

from . import kernels, sampling
from .config import AugConfig


@dataclasses.dataclass
class WarpPlan:
    """FusedWarp's per-sample description of one batch's warp (see :meth:`FusedWarp.plan`).

    grid = ybasis @ core @ xbasis^T (+ dense); frame f's point t = frames[:, f, :, :2] @ grid + frames[:, f, :, 2].
    Shapes: core (B, 2, R, R), ybasis (H, R), xbasis (W, R), frames (B, NF, 2, 3), dense (B, 2, H, W) or None.
    """

    core: Tensor
    ybasis: Tensor
    xbasis: Tensor
    frames: Tensor
    dense: Tensor | None
    size: tuple[int, int]       # output (H, W)


class FusedWarp(nn.Module):
    """Horizontal flip -> random resized crop -> random affine -> elastic deformation as ONE resampling, each
    step on where ``cfg`` switches it on (``hflip_p > 0``, ``crop_min < 1``, any affine range, ``elastic_p > 0``).

    The steps and their parameters are Kornia's (RandomHorizontalFlip, RandomResizedCrop with its default
    ``align_corners=True``, RandomAffine, RandomElasticTransform); this module folds them into one sampling grid.
    In pixel-index coordinates (pixel centres at integers) an output pixel ``p`` of the chain reads

        elastic:  p' = p + d(p) * (W/2, H/2)         d: the blurred noise field, align_corners=False units
        affine:   q  = A^-1 p'                        A: the affine matrix (input -> output pixels)
        crop:     r  = s * q + x0                     s = (x1 - x0) / (W - 1): box corners onto output corners

    and ``r`` is sampled bilinearly from the input with zero padding; the chain's zero padding at the crop's
    and the affine's frames is reproduced by a weight (see :meth:`plan`). The chain resamples three times
    (slightly blurrier); this warp once.

    The elastic field. Kornia draws uniform noise U(-1, 1) for every pixel (B x 2 x H x W numbers) and blurs
    it with a Gaussian (zero border): d = By N Bx^T per axis, By, Bx banded (H, H) and (W, W) matrices. Its
    covariance is (Bx Bx^T) kron (By By^T) / 3. :meth:`draw` samples the same covariance from its top
    ``elastic_rank`` eigen-directions per axis: d = Ly G Lx^T, G (rank x rank) Gaussian with variance 1/3,
    Ly Ly^T ~= By By^T. At 28 pixels, sigma 4 and rank 8 that keeps 99.7% of the field's variance and
    draws 64 numbers per field instead of 784. Given per-pixel ``{"noise": ...}`` parameters (Kornia's own,
    or ``elastic_rank=None``), :meth:`plan` applies the exact blur instead (the tests compare with Kornia so).

    Args:
        cfg: the augmentation settings (only the flip, crop, affine and elastic ones are read here).
        size: output (H, W); ``None``: the input's size.
        elastic_rank: eigen-directions per axis kept for the elastic field; ``None``: per-pixel noise and the
            exact blur.
        cpu_kernel: on the CPU, resample with ``fastclr.kernels.warp_sample`` (the Runtime decides).

    Shape:
        x: (B, C, H_in, W_in) float. Output: (B, C, *size).
    """

    def __init__(self, cfg: AugConfig, size: tuple[int, int] | None = None, elastic_rank: int | None = 8,
                 cpu_kernel: bool = False):
        super().__init__()
        self.cfg, self.size = cfg, None if size is None else tuple(size)
        self.steps = {name for name, on in (("flip", cfg.hflip_p > 0), ("crop", cfg.crop_scale is not None),
                                            ("affine", cfg.has_affine), ("elastic", cfg.elastic_p > 0)) if on}
        self.elastic_rank = elastic_rank
        self.cpu_kernel = cpu_kernel
        self._factors: dict = {}

    def out_size(self, in_size) -> tuple[int, int]:
        return self.size or tuple(in_size)

    def draw(self, shape: torch.Size, device: torch.device | str = "cpu") -> dict:
        """One parameter set per sample, from torch's generator for ``device``, in Kornia's parameter format:
        flip coins, crop boxes and affine parameters (``fastclr.sampling``, the distributions of Kornia's
        samplers); for the elastic field its on/off coin (probability p) and the (B, 2, rank, rank)
        coefficients described above (or, with ``elastic_rank=None``, Kornia's per-pixel noise)."""
        cfg, b, params = self.cfg, shape[0], {}
        if "flip" in self.steps:
            params["flip"] = {"batch_prob": sampling.coin(b, cfg.hflip_p, device)}
        if "crop" in self.steps:
            params["crop"] = sampling.resized_crop(b, tuple(shape[-2:]), cfg.crop_scale, tuple(cfg.crop_ratio), device)
        if "affine" in self.steps:
            size = self.out_size(shape[-2:]) if "crop" in self.steps else tuple(shape[-2:])
            params["affine"] = sampling.affine(b, size, cfg.degrees, cfg.translate, tuple(cfg.zoom), cfg.shear, device)
        if "elastic" in self.steps:
            h, w = self.out_size(shape[-2:])
            on = torch.rand(b, device=device) < cfg.elastic_p
            if self.elastic_rank is None:
                params["elastic"] = {"batch_prob": on, "noise": torch.rand(b, 2, h, w, device=device) * 2 - 1}
            else:
                r = min(self.elastic_rank, h, w)
                params["elastic"] = {"batch_prob": on,
                                     "coeffs": torch.randn(b, 2, r, r, device=device) * (1 / 3) ** 0.5}
        return params

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        params = self.draw(x.shape, x.device) if params is None else params
        plan = self.plan(x, params)
        # With a crop, every read outside the image is also outside the crop's frame, where the weight already
        # fades to black; zero padding there as well would darken the crop's edge twice (the box often touches
        # the image border). Kornia's crop never pads: it reads inside the box.
        border = "crop" in params
        b, c = x.shape[:2]
        if self.cpu_kernel and plan.dense is None and kernels.view_kernels_supported(x.reshape(b * c, 1, *x.shape[2:])):
            return kernels.warp_sample(x, plan.core, plan.ybasis, plan.xbasis, plan.frames, plan.size, border)
        grid, inside = self.maps(plan)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border" if border else "zeros", align_corners=True)
        return y if inside is None else y * inside[:, None]

    def maps(self, plan: "WarpPlan") -> tuple[Tensor, Tensor | None]:
        """The plan's grid (B, H, W, 2) and frame weight (B, H, W), with PyTorch ops (any device)."""
        grid = plan.ybasis @ plan.core @ plan.xbasis.T                  # (B, 2, H, W)
        if plan.dense is not None:
            grid = grid + plan.dense
        inside = None
        h, w = plan.size
        for f in range(plan.frames.shape[1]):                           # t = F[:, :2] grid + F[:, 2], (B, 2, H, W)
            fr = plan.frames[:, f]
            t = torch.einsum("bkc,bchw->bkhw", fr[:, :, :2], grid).add_(fr[:, :, 2, None, None])
            for axis, n in ((0, w), (1, h)):
                # clamp(min(t + 1, n - t), 0, 1) = clamp(c + 1 - |t - c|, 0, 1), c = (n - 1) / 2; scalar
                # operands and in-place steps: broadcasting a (2,)-tensor over the maps ran 4x slower
                c = (n - 1) / 2
                share = t[:, axis].sub(c).abs_().neg_().add_(c + 1).clamp_(0, 1)   # (B, H, W)
                inside = share if inside is None else inside.mul_(share)
        return grid.permute(0, 2, 3, 1), inside                         # grid: (B, H, W, 2), a view

    def plan(self, x: Tensor, params: dict) -> "WarpPlan":
        """The warp as small per-sample matrices: the grid's low-rank core and the frames' affine maps.

        Crop, inverse affine and the pixel -> grid-unit change compose into one (B, 3, 3) matrix M first;
        the elastic field's alpha, pixel scale and on/off mask fold into it too: M (p + s d) = M p + (M s) d.

        The weight reproduces the chain's zero padding at the frames in between: Kornia's affine reads the
        *cropped* image, so whatever its inverse maps outside the crop's frame is black, and the elastic warp
        likewise reads the affine's output frame. For each such intermediate coordinate t (the point q before
        the affine, the point p' before the elastic) the weight is the share of the bilinear stencil inside the
        frame [0, n-1] per axis, clamp(min(t + 1, n - t), 0, 1): exact for a locally constant image. Without it
        the views show the digit beyond the crop box, a weaker crop; the one-epoch-to-four k-NN checks fell by
        0.002-0.003 (0.9803/0.9833/0.9839 against the chain's 0.9830/0.9850/0.9866)."""
        b, _, h_in, w_in = x.shape
        size = self.out_size((h_in, w_in))
        eye = torch.eye(3, device=x.device).expand(b, 3, 3)
        a_inv = self._affine_inverse(params, eye)                       # affine output pixel -> its input pixel
        crop = self._crop_matrix(params, eye, (h_in, w_in), size)      # crop output pixel -> input pixel
        if "flip" in params:                                            # the flip comes first: it acts last here
            crop = self._flip_matrix(params["flip"], eye, w_in) @ crop
        # pixel index -> align_corners=True grid units (-1 at pixel 0, +1 at the last pixel)
        to_grid = _constant(((2 / (w_in - 1), 0.0, -1.0), (0.0, 2 / (h_in - 1), -1.0), (0.0, 0.0, 1.0)), x.device)
        m = to_grid @ crop @ a_inv                                      # output pixel -> grid units
        core, ybasis, xbasis = _affine_core(m, size)
        dense = None
        if "elastic" in params:
            core, ybasis, xbasis, dense = self._add_elastic(core, ybasis, xbasis, m[:, :2, :2], params["elastic"], size)
        frames = self._frames(params, to_grid @ crop, a_inv, core)
        return WarpPlan(core, ybasis, xbasis, frames, dense, size)

    @staticmethod
    def _affine_inverse(params: dict, eye: Tensor) -> Tensor:
        """(B, 3, 3): each sample's affine output pixel -> input pixel (identity where the affine is off)."""
        if "affine" not in params:
            return eye
        a = affine_matrix({k: v.to(eye.device, torch.float32) for k, v in params["affine"].items()})
        on = params["affine"]["batch_prob"].to(eye.device).bool()[:, None, None]
        return torch.where(on, _inverse(a), eye)

    @staticmethod
    def _flip_matrix(params: dict, eye: Tensor, w_in: int) -> Tensor:
        """(B, 3, 3): x -> (W - 1) - x for the samples Kornia's RandomHorizontalFlip chose (``batch_prob``), else
        the identity. Folded into the crop matrix, a flip costs no pass over the images."""
        on = params["batch_prob"].to(eye.device).bool()[:, None, None]
        flip = _constant(((-1.0, 0.0, w_in - 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), eye.device)
        return torch.where(on, flip, eye)

    @staticmethod
    def _crop_matrix(params: dict, eye: Tensor, in_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """(B, 3, 3): crop output pixel -> input pixel, from the crop box (identity without a crop). The box's
        corners land on the output's corners, as in Kornia's RandomResizedCrop (``align_corners=True``)."""
        h, w = size
        if "crop" not in params:
            if (h, w) != tuple(in_size):
                raise ValueError(f"without a crop the output size {size} must equal the input's {tuple(in_size)}")
            return eye
        box = params["crop"]["src"].to(eye.device, torch.float32)       # (B, 4, 2): corners, x y
        x0, y0, x1, y1 = box[:, 0, 0], box[:, 0, 1], box[:, 2, 0], box[:, 2, 1]   # inclusive pixel box
        sx, sy = (x1 - x0) / (w - 1), (y1 - y0) / (h - 1)
        zero, one = torch.zeros_like(sx), torch.ones_like(sx)
        return torch.stack([sx, zero, x0, zero, sy, y0, zero, zero, one], -1).view(-1, 3, 3)

    def _add_elastic(self, core: Tensor, ybasis: Tensor, xbasis: Tensor, lin: Tensor, e: dict,
                     size: tuple[int, int]):
        """Fold the elastic field into the grid: M (p + diag(s) d) = M p + (lin s) d. Per-pixel noise gives a
        dense (B, 2, H, W) term; the low-rank draw grows the core and the bases by its rank instead."""
        h, w = size
        dev = core.device
        k = lin * self.elastic_scale(e, h, w, dev)[:, None, :]          # (B, k, c)
        if "noise" in e:                                                # Kornia's own draw: exact, dense
            return core, ybasis, xbasis, torch.einsum("bkc,bchw->bkhw", k, self.exact_field(e, h, w, dev))
        ly, lx, coeffs = self.low_rank_field(e, h, w, dev)              # (H, r), (W, r), (B, c, r, r)
        b, r = core.shape[0], coeffs.shape[-1]
        core = torch.cat([torch.cat([core, core.new_zeros(b, 2, 2, r)], 3),
                          torch.cat([core.new_zeros(b, 2, r, 2), torch.einsum("bkc,bcij->bkij", k, coeffs)], 3)], 2)
        return core, torch.cat([ybasis, ly], 1), torch.cat([xbasis, lx], 1), None

    def _frames(self, params: dict, grid_of_crop: Tensor, a_inv: Tensor, core: Tensor) -> Tensor:
        """(B, NF, 2, 3): the intermediate frames whose zero padding the weight reproduces.

        The intermediate points are affine in the grid, per sample: q undoes the crop's axis-aligned scale and
        offset, p' = A q applies the affine forwards; t = F[:, :2] grid + F[:, 2]."""
        frames = []
        has_crop, has_affine, has_elastic = "crop" in params, "affine" in params, "elastic" in params
        if (has_crop and has_affine) or (has_elastic and (has_crop or has_affine)):
            pre = _inverse(grid_of_crop)                        # grid units -> crop output pixel (q)
            if has_crop and has_affine:
                frames.append(pre[:, :2])                               # the affine reads the crop's frame
            if has_elastic:                                             # p' = A q, the elastic's read point
                frames.append((_inverse(a_inv) @ pre)[:, :2])
        return torch.stack(frames, 1) if frames else core.new_zeros(core.shape[0], 0, 2, 3)

    def elastic_scale(self, params: dict, h: int, w: int, dev) -> Tensor:
        """(B, 2): alpha * (W/2, H/2) (the field is in align_corners=False grid units, the grid here in pixels),
        zero for the samples the module's p left out."""
        alpha = self.cfg.elastic_alpha
        on = params["batch_prob"].to(dev).float()[:, None]
        return on * _constant((alpha * w / 2, alpha * h / 2), dev)

    def exact_field(self, params: dict, h: int, w: int, dev) -> Tensor:
        """Kornia's field from per-pixel noise (B, 2, H, W): the Gaussian blur with a zero border is a banded
        (n, n) matrix per axis. Returns (B, 2, H, W), channel 0 the x displacement."""
        k, sigma = self.cfg.elastic_kernel, self.cfg.elastic_sigma
        noise = params["noise"].to(dev, torch.float32)
        return _blur_matrix(h, k, sigma, dev) @ noise @ _blur_matrix(w, k, sigma, dev).T

    def low_rank_field(self, params: dict, h: int, w: int, dev) -> tuple[Tensor, Tensor, Tensor]:
        """The field as Ly @ coeffs @ Lx^T: returns Ly (H, r), Lx (W, r) and coeffs (B, 2, r, r)."""
        k, sigma = self.cfg.elastic_kernel, self.cfg.elastic_sigma
        coeffs = params["coeffs"].to(dev, torch.float32)
        r = coeffs.shape[-1]
        return self._factor(h, k, sigma, r, dev), self._factor(w, k, sigma, r, dev), coeffs

    def _factor(self, n: int, ksize: int, sigma: float, rank: int, dev) -> Tensor:
        """(n, rank) L with L L^T the best rank-``rank`` approximation of B B^T (B: the blur matrix); cached."""
        key = (n, ksize, float(sigma), rank, str(dev))
        if key not in self._factors:
            blur = _blur_matrix(n, ksize, sigma, "cpu").double()
            val, vec = torch.linalg.eigh(blur @ blur.T)                     # ascending
            top = val.flip(0)[:rank].clamp_min(0).sqrt()
            self._factors[key] = (vec.flip(1)[:, :rank] * top).float().to(dev)
        return self._factors[key]


def _affine_core(m: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """The grid of the (B, 3, 3) map ``m`` as core (B, 2, 2, 2), ybasis (H, 2), xbasis (W, 2).

    Every term of grid[b, k, h, w] is a sum of (function of h) * (function of w): shift_k * 1 * 1,
    lin_k0 * 1 * w, lin_k1 * h * 1 (and the elastic field's sum_ij Ly[h, i] G[i, j] Lx[w, j]). So the grid
    is Ybasis @ core_k @ Xbasis^T with a small per-sample core: two thin matmuls write it, instead of a
    pass over the (B, 2, H, W) grid per term."""
    h, w = size
    dev = m.device
    lin, shift = m[:, :2, :2], m[:, :2, 2]                          # (B, 2, 2), (B, 2)
    core = torch.zeros(m.shape[0], 2, 2, 2, device=dev)             # (B, k, y-basis [1, h], x-basis [1, w])
    core[:, :, 0, 0], core[:, :, 0, 1], core[:, :, 1, 0] = shift, lin[:, :, 0], lin[:, :, 1]
    ybasis = torch.stack([torch.ones(h, device=dev), torch.arange(h, device=dev, dtype=torch.float32)], 1)
    xbasis = torch.stack([torch.ones(w, device=dev), torch.arange(w, device=dev, dtype=torch.float32)], 1)
    return core, ybasis, xbasis


_DEG = math.pi / 180.0


def affine_matrix(p: dict) -> Tensor:
    """(B, 3, 3) float32 input -> output pixel maps from affine parameters in Kornia's format (translations
    (B, 2) pixels, center (B, 2), scale (B, 2), angle (B,) degrees clockwise as displayed, shear_x / shear_y
    (B,) degrees): rotation and scale about the centre, plus the translation, after an x-then-y shear about the
    centre. The same operations in the same order as Kornia's ``get_affine_matrix2d`` (what RandomAffine
    computes), so the matrices are equal bit for bit (``tests/test_augment.py``)."""
    center, scale = p["center"], p["scale"]
    b, dev = center.shape[0], center.device
    eye = torch.eye(3, device=dev).repeat(b, 1, 1)
    shift, unshift, scale_m, rot = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    shift[:, :2, 2] = center
    unshift[:, :2, 2] = -center
    scale_m[:, 0, 0] *= scale[:, 0]
    scale_m[:, 1, 1] *= scale[:, 1]
    rad = -p["angle"] * _DEG                                       # Kornia negates: positive is clockwise
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot[:, :2, :2] = torch.stack([cos, sin, -sin, cos], -1).view(b, 2, 2)
    m = shift @ rot @ scale_m @ unshift
    m[:, :2, 2] += p["translations"]
    tx, ty = torch.tan(p["shear_x"] * _DEG), torch.tan(p["shear_y"] * _DEG)
    x, y = center[:, 0], center[:, 1]
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    shear = torch.stack([one, -tx, tx * y, -ty, one + tx * ty, ty * (x - tx * y), zero, zero, one], -1).view(b, 3, 3)
    return m @ shear


_CONSTANTS: dict = {}


def _constant(values: tuple, device) -> Tensor:
    """A small float32 constant, made once per device. Made from Python on every call it would be a host-to-device
    copy per step on CUDA, which also keeps the step out of a CUDA graph."""
    key = (values, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def _inverse(m: Tensor) -> Tensor:
    """Batched matrix inverse without ``linalg.inv``'s singularity check, which reads a flag back from the device
    (a host sync) on CUDA; the matrices here are affine maps with nonzero scale, never singular."""
    return torch.linalg.inv_ex(m)[0]


def _blur_matrix(n: int, ksize: int, sigma: float, dev) -> Tensor:
    """(n, n) matrix M with ``M @ v`` = Kornia's 1-D Gaussian filter of v with zero padding (kernel centred)."""
    k = get_gaussian_kernel1d(ksize, float(sigma), device=dev).reshape(-1).float()   # (ksize,)
    r = ksize // 2
    i = torch.arange(n, device=dev)
    off = i[None, :] - i[:, None] + r                                   # column j, row i -> kernel tap j - i + r
    inside = (off >= 0) & (off < ksize)
    return torch.where(inside, k[off.clamp(0, ksize - 1)], torch.zeros((), device=dev))
