"""Datasets as whole uint8 tensors, and the two ways of feeding view pairs to the training step.

* :func:`load_dataset` reads MNIST / Fashion-MNIST through torchvision's dataset classes (downloading
  when the files are missing and the internet is there) and returns ``(N, 1, 28, 28)`` uint8 images and
  ``(N,)`` int64 labels. Files are checked (IDX header and size) before use, so a truncated copy fails
  with one clear message instead of a reshape error deep inside torchvision.
* :data:`DATASETS`: the dataset registry (folders, classes, normalisation constants).
* :class:`DevicePairs` (the default): the whole uint8 dataset moved to the device once, an epoch as a
  random permutation, batches sliced there and augmented there by ``fastclr.augment.SimCLRAugment``
  (parameters drawn on the device), a block of batches per call. No DataLoader, no worker processes, no PIL.
* :class:`TorchvisionPairs` (``--loader torchvision``): the classic path, a DataLoader over per-sample
  torchvision.transforms.v2 (:func:`torchvision_transform`, from the same AugConfig) with worker processes,
  kept for comparison.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import AugConfig
from .errors import FastclrError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    """What fastclr knows of a dataset: where torchvision keeps it, its classes, and its pixel statistics (baked
    into the encoder, so that a loaded encoder takes raw [0, 1] images)."""

    folder: str          # torchvision's folder under the data root
    tv_class: str        # torchvision.datasets class name
    classes: tuple[str, ...]
    mean: float          # of the training images' pixels in [0, 1]
    std: float


# the one dataset registry
DATASETS = {
    "mnist": DatasetInfo("MNIST", "MNIST", tuple(str(d) for d in range(10)), 0.1307, 0.3081),
    "fashion-mnist": DatasetInfo("FashionMNIST", "FashionMNIST", (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"), 0.2860, 0.3530),
}

# (file stem, IDX magic, expected shape)
_FILES = {
    True: (("train-images-idx3-ubyte", 2051, (60000, 28, 28)), ("train-labels-idx1-ubyte", 2049, (60000,))),
    False: (("t10k-images-idx3-ubyte", 2051, (10000, 28, 28)), ("t10k-labels-idx1-ubyte", 2049, (10000,))),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise FastclrError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """--data-dir, else $FASTCLR_DATA, else ./data."""
    return Path(data_dir or os.environ.get("FASTCLR_DATA") or "data").expanduser()


def check_idx_file(path: Path, magic: int, shape: tuple[int, ...]) -> None:
    """Raise FastclrError unless ``path`` is a complete IDX file of the expected magic and shape."""
    fix = "delete it and run again with internet access, or point --data-dir at a good copy"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(4 + 4 * len(shape))
    except OSError as exc:
        raise FastclrError(f"cannot read {path}: {exc.strerror}") from None
    if len(header) < 4 + 4 * len(shape):
        raise FastclrError(f"{path} is truncated ({size} bytes, no complete header); {fix}")
    got_magic, *dims = struct.unpack(f">{1 + len(shape)}I", header)
    if got_magic != magic or tuple(dims) != shape:
        raise FastclrError(f"{path} is not the expected IDX file (magic {got_magic}, dims {dims}; "
                           f"expected {magic}, {list(shape)}); {fix}")
    expected = len(header) + int(np.prod(shape))
    if size != expected:
        raise FastclrError(f"{path} is truncated or padded ({size} bytes, expected {expected}); {fix}")


def _raw_dir(root: Path, info: DatasetInfo) -> Path:
    return root / info.folder / "raw"


def _files_present(raw: Path, train: bool) -> bool:
    return all((raw / stem).is_file() for stem, _, _ in _FILES[train])


def _unpack_debian_fashion_mnist(root: Path) -> Path:
    """Decompress the Debian package's .gz files into torchvision's layout; returns the root used.

    The root itself when writable, else a cache folder (~/.cache/fastclr/data)."""
    for target_root in (root, Path.home() / ".cache" / "fastclr" / "data"):
        raw = _raw_dir(target_root, DATASETS["fashion-mnist"])
        try:
            raw.mkdir(parents=True, exist_ok=True)
            for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
                out = raw / gz.name[:-3]
                if not out.exists():
                    tmp = out.with_suffix(".tmp")
                    with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    tmp.replace(out)
            return target_root
        except OSError:
            continue
    return root


def _download(info: DatasetInfo, root: Path, train: bool):
    import torchvision.datasets as tvd

    raw = _raw_dir(root, info)
    try:
        return getattr(tvd, info.tv_class)(root=str(root), train=train, download=True)
    except Exception as exc:  # URLError, RuntimeError("Error downloading ..."), PermissionError, ...
        names = ", ".join(stem for stem, _, _ in _FILES[True] + _FILES[False])
        raise FastclrError(
            f"{info.folder} is not at {raw} and could not be downloaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Put the four files ({names}) "
            f"there, or pass --data-dir / set FASTCLR_DATA to a folder holding {info.folder}/raw/") from None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """Load a split as whole tensors.

    Returns:
        images: (N, 1, 28, 28) uint8, labels: (N,) int64.
    """
    info = dataset_info(name)
    root = resolve_data_dir(data_dir)
    if name == "fashion-mnist" and not _files_present(_raw_dir(root, info), train) \
            and DEBIAN_FASHION_MNIST.is_dir():
        root = _unpack_debian_fashion_mnist(root)
    raw = _raw_dir(root, info)
    if _files_present(raw, train):
        for stem, magic, shape in _FILES[train]:
            check_idx_file(raw / stem, magic, shape)
        import torchvision.datasets as tvd
        ds = getattr(tvd, info.tv_class)(root=str(root), train=train, download=False)
    else:
        ds = _download(info, root, train)
        for stem, magic, shape in _FILES[train]:
            check_idx_file(raw / stem, magic, shape)
    images = ds.data.unsqueeze(1).contiguous()                 # (N, 28, 28) -> (N, 1, 28, 28)
    return images, ds.targets.long()


def to_float(images: Tensor) -> Tensor:
    """uint8 (B, 1, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255)


# --------------------------------------------------------------------------- view-pair sources

class PairSource:
    """What the training loop asks of a view-pair source; both loaders implement it.

    ``len(source)`` batches an epoch; ``iterate(start_batch)`` yields one epoch's ``(view1, view2)`` batches
    from ``start_batch`` on; ``state_dict()`` / ``load_state_dict()`` carry the data order across a resume.

    An epoch is a random permutation of the images drawn from ``self.generator`` (seeded once), this rank's
    shard of it (DDP: every rank draws the same permutation), trimmed to whole batches. ``state_dict()``
    holds the generator's state at the start of the current epoch and now: a run resumed mid-epoch replays
    the epoch's draws and skips the batches it trained (its indices, not its views, so nothing else is
    drawn); a run resumed at an epoch boundary carries on from now.

    Subclasses implement ``_views(batches, start_batch)``: ``batches`` is the epoch's tuple of (batch_size,)
    index tensors.
    """

    def __init__(self, n_images: int, batch_size: int, generator: torch.Generator, rank: int, world_size: int):
        self.n_images, self.batch_size, self.generator = n_images, batch_size, generator
        self.rank, self.world_size = rank, world_size
        self._epoch_start: Tensor | None = None
        self._restore: dict | None = None

    def __len__(self) -> int:
        return self.n_images // (self.batch_size * self.world_size)

    def epoch_indices(self) -> Tensor:
        """A fresh permutation, this rank's shard of it, trimmed to whole batches: (len * batch_size,)."""
        perm = torch.randperm(self.n_images, generator=self.generator, device=self.generator.device)
        shard = perm[self.rank::self.world_size]
        return shard[: len(self) * self.batch_size]

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_batch: int = 0):
        """One epoch from batch ``start_batch`` on (a resumed run skips what it already trained on)."""
        if self._restore is not None:
            self.generator.set_state(self._restore["epoch_start" if start_batch else "now"])
            self._restore = None
        self._epoch_start = self.generator.get_state()
        yield from self._views(self.epoch_indices().split(self.batch_size), start_batch)

    def _views(self, batches: tuple[Tensor, ...], start_batch: int):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """CPU ByteTensors: the generator at the current epoch's start, and now."""
        now = self.generator.get_state()
        return {"epoch_start": now if self._epoch_start is None else self._epoch_start, "now": now}

    def load_state_dict(self, state: dict) -> None:
        """Take effect at the next ``iterate``: mid-epoch (start_batch > 0) from the epoch's start, else now."""
        self._restore = {k: v.cpu() for k, v in state.items()}


class DevicePairs(PairSource):
    """Yields ``(view1, view2)`` float batches augmented on the device; one uint8 copy of the data there.

    Views are made ``block_views`` at a time (default: the augmentation's ``views_per_call``, 4,096 28 x 28 views
    for the fused SimCLRAugment: 16 batches of 128 pairs; else one batch) and handed out batch by batch. Why: a call's
    fixed cost (drawing the parameters, building the warp's matrices: a few hundred small ops) is paid once
    per block instead of once per step; parameters are still drawn per sample. Each block's randomness comes
    from its own seed (the epoch's seed from ``generator``, plus the block's first batch), so a run resumed
    mid-epoch makes exactly the views it would have made.

    Args:
        images: (N, C, H, W) uint8 on any device.
        augment: a module mapping a float (B, C, H, W) batch to an augmented one (e.g. SimCLRAugment).
        rank, world_size: this process's shard of every epoch's permutation (DDP); drop-last.
        block_views: views per augmentation call (both views of block_views / 2 images); None: as above.
    """

    def __init__(self, images: Tensor, batch_size: int, device: torch.device, augment, seed: int = 0,
                 rank: int = 0, world_size: int = 1, block_views: int | None = None):
        super().__init__(len(images), batch_size, torch.Generator(device=device).manual_seed(seed), rank, world_size)
        # uint8 on the device: 4x smaller than float and the conversion fuses with the gather
        self.images = images.to(device, non_blocking=True)
        self.device, self.augment = device, augment
        per_call = augment.views_per_call(tuple(images.shape[1:])) if hasattr(augment, "views_per_call") else None
        block_views = block_views or per_call or 2 * batch_size
        self.block = max(1, block_views // (2 * batch_size))            # batches per augmentation call

    def _rng_devices(self) -> list[int]:
        """The CUDA device whose RNG a block reseeds (and fork_rng restores afterwards); none on CPU."""
        if self.device.type != "cuda":
            return []
        return [torch.cuda.current_device() if self.device.index is None else self.device.index]

    def _views(self, batches: tuple[Tensor, ...], start_batch: int):
        epoch_seed = int(torch.randint(2**62, (1,), generator=self.generator, device=self.device))
        for first in range(start_batch - start_batch % self.block, len(batches), self.block):
            block = batches[first: first + self.block]
            x = to_float(self.images[torch.cat(block)])             # gather + convert on the device
            with torch.random.fork_rng(devices=self._rng_devices()):
                torch.manual_seed(epoch_seed + first)
                # both views in ONE call: the first half of the output is every image's first view
                v1, v2 = self.augment(torch.cat([x, x])).chunk(2)
            for i in range(max(0, start_batch - first), len(block)):
                rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield v1[rows], v2[rows]


class _TwoViewDataset(torch.utils.data.Dataset):
    def __init__(self, images: Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i]                                   # (1, H, W) uint8
        return self.transform(x), self.transform(x)


# AugConfig fields torchvision's transforms cannot express, each with why (refused rather than dropped)
TORCHVISION_UNSUPPORTED = {
    "elastic_kernel": "torchvision's ElasticTransform sizes its Gaussian kernel from sigma (8 sigma + 1 taps)",
}


def torchvision_transform(cfg: AugConfig, size: tuple[int, int], identity: bool = False):
    """Per-sample CPU transforms (torchvision.transforms.v2) drawing ``cfg``'s views of a (C, H, W) uint8 image,
    in SimCLRAugment's order: thickness, flip, crop (to ``size``), affine, elastic, colour jitter, greyscale,
    intensity jitter, blur, erasing.

    Every field is honoured except those in :data:`TORCHVISION_UNSUPPORTED`, which raise FastclrError when set
    away from their default. Where torchvision's parametrisation differs, the field is converted: the elastic
    warp's alpha is in pixels per image width there (alpha_tv = elastic_alpha * W gives Kornia's displacement
    scale), and its kernel spans 8 sigma + 1 pixels where Kornia's (the default path's) spans
    ``elastic_kernel``."""
    from torchvision.transforms import v2

    from .augment import ERASE_RATIO, RandomIntensity, RandomThickness

    if identity:
        return v2.ToDtype(torch.float32, scale=True)
    default = AugConfig().scaled_to(size)
    for name, why in TORCHVISION_UNSUPPORTED.items():
        if getattr(cfg, name) != getattr(default, name):
            raise FastclrError(f"--loader torchvision cannot honour --{name.replace('_', '-')} "
                               f"{getattr(cfg, name)}: {why}; use --loader device")
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if cfg.thickness_p > 0:
        thickness = RandomThickness(cfg.thickness_p)
        steps.append(v2.Lambda(lambda x: thickness(x[None])[0]))
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    if cfg.crop_scale is not None:
        steps.append(v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=tuple(cfg.crop_ratio), antialias=True))
    if cfg.has_affine:
        steps.append(v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate),
                                     scale=tuple(cfg.zoom), shear=cfg.shear))
    if cfg.elastic_p > 0:
        elastic = v2.ElasticTransform(alpha=cfg.elastic_alpha * size[1], sigma=cfg.elastic_sigma)
        steps.append(v2.RandomApply([elastic], p=cfg.elastic_p))
    if cfg.has_color_jitter:    # torchvision draws a random order of the four per sample; fastclr's is fixed
        steps.append(v2.RandomApply([v2.ColorJitter(*cfg.color_factors)], p=cfg.color_p))
    if cfg.gray_p > 0:
        steps.append(v2.RandomGrayscale(cfg.gray_p))
    if cfg.has_jitter:
        intensity = RandomIntensity(cfg.brightness, cfg.contrast, cfg.jitter_p)
        steps.append(v2.Lambda(lambda x: intensity(x[None])[0]))
    if cfg.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(3, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_p))
    if cfg.erase_p > 0:
        steps.append(v2.RandomErasing(p=cfg.erase_p, scale=tuple(cfg.erase_scale), ratio=ERASE_RATIO, value=0))
    return v2.Compose(steps)


class _Batches:
    """A DataLoader batch sampler whose batches are set before each epoch (by TorchvisionPairs)."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionPairs(PairSource):
    """The DataLoader path: per-sample CPU augmentation in ``workers`` processes, pinned host memory and
    non-blocking copies to the device.

    The data order is PairSource's (so a resume skips exactly the trained batches). With ``workers=0`` the
    transforms draw from the global torch RNG in this process, which a checkpoint saves, so a resumed run
    is bit-equal to an uninterrupted one; with workers, each worker's RNG is seeded once per worker, and a
    resumed run sees the same images in the same order with other random views.
    """

    def __init__(self, images: Tensor, batch_size: int, device: torch.device, transform, workers: int = 2,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(len(images), batch_size, torch.Generator().manual_seed(seed), rank, world_size)
        dataset = _TwoViewDataset(images.cpu(), transform)
        self.device = device
        self.sampler = _Batches()
        # The loader's own generator seeds the workers only (the order is ours): a separate one, so that
        # drawing those seeds leaves the data order's stream alone.
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed + 1))

    def _views(self, batches: tuple[Tensor, ...], start_batch: int):
        self.sampler.batches = [b.tolist() for b in batches[start_batch:]]
        for v1, v2 in self.loader:
            yield v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True)
