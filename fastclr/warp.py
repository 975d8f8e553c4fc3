"""FusedWarp: Kornia's random resized crop, affine and elastic deformation as ONE resampling of the batch.

Kornia's modules draw the per-sample parameters (or :meth:`FusedWarp.draw` does, for the elastic field's
low-rank draw); :meth:`FusedWarp.plan` turns them into small per-sample matrices (a :class:`WarpPlan`), and
the forward resamples once, with PyTorch ops or, on the CPU, ``fastclr.kernels.warp_sample``.
``tests/test_augment.py`` checks each part against Kornia's own output for the same parameters.
"""
from __future__ import annotations

import dataclasses

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.filters.kernels import get_gaussian_kernel1d
from torch import Tensor, nn

from . import kernels, sampling


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


class FusedWarp(nn.Module):
    """Kornia's RandomHorizontalFlip -> RandomResizedCrop -> RandomAffine -> RandomElasticTransform as ONE
    resampling (each step optional).

    Kornia's crop and affine modules draw the per-sample parameters (``forward_parameters``: their
    distributions exactly); this module turns them into one sampling grid. In pixel-index coordinates
    (pixel centres at integers) an output pixel ``p`` of the chain reads

        elastic:  p' = p + d(p) * (W/2, H/2)         d: the blurred noise field, align_corners=False units
        affine:   q  = A^-1 p'                        A: RandomAffine's matrix (input -> output pixels)
        crop:     r  = s * q + x0                     s = (x1 - x0) / (W - 1): box corners onto output
                                                      corners (Kornia's align_corners=True default)

    and ``r`` is sampled bilinearly from the input with zero padding; the chain's zero padding at the crop's
    and the affine's frames is reproduced by a weight (see :meth:`plan`). The chain resamples three times
    (slightly blurrier); this warp once.

    The elastic field. Kornia draws uniform noise U(-1, 1) for every pixel (B x 2 x H x W numbers) and blurs
    it with a Gaussian (zero border): d = By N Bx^T per axis, By, Bx banded (H, H) and (W, W) matrices. Its
    covariance is (Bx Bx^T) kron (By By^T) / 3. :meth:`draw` samples the same covariance from its top
    ``elastic_rank`` eigen-directions per axis: d = Ly G Lx^T, G (rank x rank) Gaussian with variance 1/3,
    Ly Ly^T ~= By By^T. At 28 pixels, sigma 4 and rank 8 that keeps 99.7% of the field's variance and
    draws 64 numbers per field instead of 784 (Kornia's draw was the largest single cost of the warp).
    Given Kornia's own ``{"noise": ...}`` parameters, :meth:`plan` applies the exact blur instead (the
    tests use this to compare with Kornia's output).

    Args:
        crop, affine, elastic, flip: configured Kornia modules, or ``None`` to leave that step out.
        size: output (H, W).
        elastic_rank: eigen-directions per axis kept for the elastic field; ``None``: Kornia's per-pixel noise
            and the exact blur.

    Shape:
        x: (B, C, H_in, W_in) float. Output: (B, C, *size).
    """

    def __init__(self, crop: K.RandomResizedCrop | None, affine: K.RandomAffine | None,
                 elastic: K.RandomElasticTransform | None, size: tuple[int, int], elastic_rank: int | None = 8,
                 cpu_kernel: bool = False, flip: K.RandomHorizontalFlip | None = None, sampler: str = "device"):
        super().__init__()
        if sampler not in ("device", "kornia"):
            raise ValueError(f"sampler must be 'device' or 'kornia', got {sampler!r}")
        self.sampler = sampler
        self.crop, self.affine, self.elastic, self.size = crop, affine, elastic, tuple(size)
        self.flip = flip
        self.elastic_rank = elastic_rank
        self.cpu_kernel = cpu_kernel
        self._factors: dict = {}

    def draw(self, shape: torch.Size, device: torch.device | str = "cpu") -> dict:
        """One parameter set per sample, from torch's generator for ``device``: flip, crop and affine from
        ``fastclr.sampling`` on ``device`` (``sampler="device"``, the default) or from Kornia's own samplers (on
        the CPU; ``sampler="kornia"``), in Kornia's parameter format either way; for the elastic field its on/off
        draw (probability p) and the (B, 2, rank, rank) coefficients described above, on ``device``."""
        if self.sampler == "kornia":
            params = {name: m.forward_parameters(shape) for name, m in
                      (("flip", self.flip), ("crop", self.crop), ("affine", self.affine)) if m is not None}
        else:
            params = self._draw_on_device(shape, device)
        if self.elastic is not None and self.elastic_rank is None:
            params["elastic"] = self.elastic.forward_parameters(shape)      # Kornia's per-pixel noise
        elif self.elastic is not None:
            b, r = shape[0], min(self.elastic_rank, *self.size)
            params["elastic"] = {"batch_prob": torch.rand(b, device=device) < self.elastic.p,
                                 "coeffs": torch.randn(b, 2, r, r, device=device) * (1 / 3) ** 0.5}
        return params

    def _draw_on_device(self, shape: torch.Size, device) -> dict:
        """Flip, crop and affine parameters with the distributions of the modules' Kornia samplers."""
        b, params = shape[0], {}
        if self.flip is not None:
            params["flip"] = {"batch_prob": sampling.coin(b, self.flip.p, device)}
        if self.crop is not None:
            g = self.crop._param_generator
            params["crop"] = sampling.resized_crop(b, tuple(shape[-2:]), tuple(g.scale), tuple(g.ratio), device)
        if self.affine is not None:
            g = self.affine._param_generator
            params["affine"] = sampling.affine(b, self.size if self.crop is not None else tuple(shape[-2:]),
                                               g.degrees, g.translate, g.scale, g.shear, device)
        return params

    def forward(self, x: Tensor, params: dict | None = None) -> Tensor:
        params = self.draw(x.shape, x.device) if params is None else params
        plan = self.plan(x, params)
        # With a crop, every read outside the image is also outside the crop's frame, where the weight already
        # fades to black; zero padding there as well would darken the crop's edge twice (the box often touches
        # the image border). Kornia's crop never pads: it reads inside the box.
        border = "crop" in params
        if self.cpu_kernel and plan.dense is None and kernels.view_kernels_supported(x):
            return kernels.warp_sample(x, plan.core, plan.ybasis, plan.xbasis, plan.frames, self.size, border)
        grid, inside = self.maps(plan)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border" if border else "zeros", align_corners=True)
        return y if inside is None else y * inside[:, None]

    def grid(self, x: Tensor, params: dict) -> tuple[Tensor, Tensor | None]:
        """The sampling grid (B, H, W, 2) in grid_sample's align_corners=True units and the frames' weight
        (B, H, W) (``None`` without intermediate frames); see :meth:`plan` and :meth:`maps`."""
        return self.maps(self.plan(x, params))

    def maps(self, plan: "WarpPlan") -> tuple[Tensor, Tensor | None]:
        """The plan's grid (B, H, W, 2) and frame weight (B, H, W), with PyTorch ops (any device)."""
        grid = plan.ybasis @ plan.core @ plan.xbasis.T                  # (B, 2, H, W)
        if plan.dense is not None:
            grid = grid + plan.dense
        inside = None
        h, w = self.size
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
        eye = torch.eye(3, device=x.device).expand(b, 3, 3)
        a_inv = self._affine_inverse(x, params, eye)                   # affine output pixel -> its input pixel
        crop = self._crop_matrix(params, eye, (h_in, w_in))           # crop output pixel -> input pixel
        if "flip" in params:                                            # the flip comes first: it acts last here
            crop = self._flip_matrix(params["flip"], eye, w_in) @ crop
        # pixel index -> align_corners=True grid units (-1 at pixel 0, +1 at the last pixel)
        to_grid = _constant(((2 / (w_in - 1), 0.0, -1.0), (0.0, 2 / (h_in - 1), -1.0), (0.0, 0.0, 1.0)), x.device)
        m = to_grid @ crop @ a_inv                                      # output pixel -> grid units
        core, ybasis, xbasis = self._affine_core(m)
        dense = None
        if "elastic" in params:
            core, ybasis, xbasis, dense = self._add_elastic(core, ybasis, xbasis, m[:, :2, :2], params["elastic"])
        frames = self._frames(params, to_grid @ crop, a_inv, core)
        return WarpPlan(core, ybasis, xbasis, frames, dense)

    def _affine_inverse(self, x: Tensor, params: dict, eye: Tensor) -> Tensor:
        """(B, 3, 3): each sample's affine output pixel -> input pixel (identity where the affine is off)."""
        if "affine" not in params:
            return eye
        a = self.affine.compute_transformation(x, params["affine"], self.affine.flags).float()
        on = params["affine"]["batch_prob"].to(x.device).bool()[:, None, None]
        return torch.where(on, _inverse(a), eye)

    @staticmethod
    def _flip_matrix(params: dict, eye: Tensor, w_in: int) -> Tensor:
        """(B, 3, 3): x -> (W - 1) - x for the samples Kornia's RandomHorizontalFlip chose (``batch_prob``), else
        the identity. Folded into the crop matrix, a flip costs no pass over the images."""
        on = params["batch_prob"].to(eye.device).bool()[:, None, None]
        flip = _constant(((-1.0, 0.0, w_in - 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), eye.device)
        return torch.where(on, flip, eye)

    def _crop_matrix(self, params: dict, eye: Tensor, in_size: tuple[int, int]) -> Tensor:
        """(B, 3, 3): crop output pixel -> input pixel, from Kornia's crop box (identity without a crop)."""
        h, w = self.size
        if "crop" not in params:
            if (h, w) != tuple(in_size):
                raise ValueError(f"without a crop the output size {self.size} must equal the input's {tuple(in_size)}")
            return eye
        box = params["crop"]["src"].to(eye.device, torch.float32)       # (B, 4, 2): corners, x y
        x0, y0, x1, y1 = box[:, 0, 0], box[:, 0, 1], box[:, 2, 0], box[:, 2, 1]   # inclusive pixel box
        if self.crop.flags["align_corners"]:        # Kornia's default: box corners onto output corners
            sx, sy = (x1 - x0) / (w - 1), (y1 - y0) / (h - 1)
            ox, oy = x0, y0
        else:                                       # half-pixel resize of the (x1 - x0 + 1)-pixel slice
            sx, sy = (x1 - x0 + 1) / w, (y1 - y0 + 1) / h
            ox, oy = x0 + sx / 2 - 0.5, y0 + sy / 2 - 0.5
        zero, one = torch.zeros_like(sx), torch.ones_like(sx)
        return torch.stack([sx, zero, ox, zero, sy, oy, zero, zero, one], -1).view(-1, 3, 3)

    def _affine_core(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The grid of the (B, 3, 3) map ``m`` as core (B, 2, 2, 2), ybasis (H, 2), xbasis (W, 2).

        Every term of grid[b, k, h, w] is a sum of (function of h) * (function of w): shift_k * 1 * 1,
        lin_k0 * 1 * w, lin_k1 * h * 1 (and the elastic field's sum_ij Ly[h, i] G[i, j] Lx[w, j]). So the grid
        is Ybasis @ core_k @ Xbasis^T with a small per-sample core: two thin matmuls write it, instead of a
        pass over the (B, 2, H, W) grid per term."""
        h, w = self.size
        dev = m.device
        lin, shift = m[:, :2, :2], m[:, :2, 2]                          # (B, 2, 2), (B, 2)
        core = torch.zeros(m.shape[0], 2, 2, 2, device=dev)             # (B, k, y-basis [1, h], x-basis [1, w])
        core[:, :, 0, 0], core[:, :, 0, 1], core[:, :, 1, 0] = shift, lin[:, :, 0], lin[:, :, 1]
        ybasis = torch.stack([torch.ones(h, device=dev), torch.arange(h, device=dev, dtype=torch.float32)], 1)
        xbasis = torch.stack([torch.ones(w, device=dev), torch.arange(w, device=dev, dtype=torch.float32)], 1)
        return core, ybasis, xbasis

    def _add_elastic(self, core: Tensor, ybasis: Tensor, xbasis: Tensor, lin: Tensor, e: dict):
        """Fold the elastic field into the grid: M (p + diag(s) d) = M p + (lin s) d. Kornia's own noise gives a
        dense (B, 2, H, W) term; the low-rank draw grows the core and the bases by its rank instead."""
        h, w = self.size
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
        (ay, ax) = self.elastic.flags["alpha"]
        on = params["batch_prob"].to(dev).float()[:, None]
        return on * _constant((ax * w / 2, ay * h / 2), dev)

    def exact_field(self, params: dict, h: int, w: int, dev) -> Tensor:
        """Kornia's field from Kornia's noise (B, 2, H, W): the Gaussian blur with a zero border is a banded
        (n, n) matrix per axis. Returns (B, 2, H, W), channel 0 the x displacement."""
        (ky, kx), (sy, sx) = self.elastic.flags["kernel_size"], self.elastic.flags["sigma"]
        noise = params["noise"].to(dev, torch.float32)
        return _blur_matrix(h, ky, sy, dev) @ noise @ _blur_matrix(w, kx, sx, dev).T

    def low_rank_field(self, params: dict, h: int, w: int, dev) -> tuple[Tensor, Tensor, Tensor]:
        """The field as Ly @ coeffs @ Lx^T: returns Ly (H, r), Lx (W, r) and coeffs (B, 2, r, r)."""
        (ky, kx), (sy, sx) = self.elastic.flags["kernel_size"], self.elastic.flags["sigma"]
        coeffs = params["coeffs"].to(dev, torch.float32)
        r = coeffs.shape[-1]
        return self._factor(h, ky, sy, r, dev), self._factor(w, kx, sx, r, dev), coeffs

    def _factor(self, n: int, ksize: int, sigma: float, rank: int, dev) -> Tensor:
        """(n, rank) L with L L^T the best rank-``rank`` approximation of B B^T (B: the blur matrix); cached."""
        key = (n, ksize, float(sigma), rank, str(dev))
        if key not in self._factors:
            blur = _blur_matrix(n, ksize, sigma, "cpu").double()
            val, vec = torch.linalg.eigh(blur @ blur.T)                     # ascending
            top = val.flip(0)[:rank].clamp_min(0).sqrt()
            self._factors[key] = (vec.flip(1)[:, :rank] * top).float().to(dev)
        return self._factors[key]


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
