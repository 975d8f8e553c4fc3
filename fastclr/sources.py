"""Every data source as the same thing: whole uint8 image tensors (N, C, H, W), labels, class names and the
training pixels' statistics (:class:`ImageData`), from :func:`load_source`.

``--dataset`` (or ``--data``) names one of:

* a built-in dataset: ``mnist`` and ``fashion-mnist`` (IDX files, ``fastclr.data``), ``kmnist``, ``cifar10``,
  ``cifar100``, ``svhn`` and ``stl10`` through torchvision's classes, which download when the files are missing
  and check their own files; offline, or with a damaged file, the run stops with one line saying what to do.
  STL-10 trains on its unlabeled and train splits and evaluates with the labelled ones.
* an image folder in torchvision's ``ImageFolder`` layout: ``train/`` and ``test/`` (or ``val/``) subfolders
  with one folder per class, or one tree of class folders split by ``--test-fraction`` (stratified, seeded), or
  a folder of images with no class folders (unlabeled). PNG, JPEG, BMP and WebP; other files are skipped and
  counted. Decoded once in worker processes and cached (``$FASTCLR_CACHE/decoded``, keyed by the file list,
  sizes and modification times).
* an ``.npz`` file with MedMNIST's keys (``train_images``, ``train_labels``, ``val_*``, ``test_*``) or Keras's
  (``x_train``, ``y_train``, ``x_test``, ``y_test``); without labels it is unlabeled. ``val_*`` is the test
  split where there is no ``test_*``, and unused otherwise (the run's first lines say so).

Images become C = 1 or 3 channels (RGBA and palette images RGB; ``--channels`` forces either) and one size
(``--image-size`` resizes every image once, at load, without cropping; mixed sizes need it). MNIST and
Fashion-MNIST keep their published statistics; every other source gets per-channel mean and std from its
training split. Everything is checked before the run folder is made.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data import DATASETS, dataset_info, load_dataset, resolve_data_dir
from .errors import FastclrError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CACHE_VERSION = 1


@dataclass
class ImageData:
    """A source's splits as whole tensors. Shapes: ``*_x`` (N, C, H, W) uint8, ``*_y`` (N,) int64 or None
    (unlabeled); ``pretrain_x``: what SimCLR trains on where that differs from ``train_x`` (STL-10)."""

    train_x: Tensor
    train_y: Tensor | None
    test_x: Tensor | None
    test_y: Tensor | None
    classes: tuple[str, ...] | None
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    pretrain_x: Tensor | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.train_y is not None and self.test_x is not None and self.test_y is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def for_eval(self) -> dict:
        """The dict ``fastclr.eval.evaluate`` reads."""
        return dict(train_x=self.train_x, train_y=self.train_y, test_x=self.test_x, test_y=self.test_y,
                    classes=self.classes)


@dataclass(frozen=True)
class SourceSpec:
    """What a source is and how to read it: the run's ``dataset``, ``data_dir``, ``image_size``, ``channels``,
    ``test_fraction`` and ``seed`` settings."""

    dataset: str
    data_dir: str | None = None
    image_size: int = 0
    channels: int = 0
    test_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def of(cls, cfg) -> "SourceSpec":
        return cls(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.channels, cfg.test_fraction, cfg.seed)


def load_source(spec: SourceSpec) -> ImageData:
    """The source ``spec.dataset`` names, as ImageData; FastclrError (one line) for anything wrong with it."""
    if spec.dataset in DATASETS:
        data = _idx_dataset(spec)
    elif spec.dataset in TORCHVISION:
        data = _torchvision_dataset(spec)
    else:
        path = Path(spec.dataset).expanduser()
        if path.suffix == ".npz" and path.is_file():
            data = _npz(path, spec)
        elif path.is_dir():
            data = _folder(path, spec)
        else:
            raise FastclrError(f"--dataset {spec.dataset!r} is neither a built-in dataset ({', '.join(BUILT_IN)}) "
                               "nor an existing image folder or .npz file")
    return _finish(data, spec)


def is_source(name: str) -> bool:
    """A built-in name, or a path that exists (checked again, in full, by load_source)."""
    return name in BUILT_IN or Path(name).expanduser().exists()


GREY_MODES = ("L", "1", "I", "I;16", "F", "LA")      # PIL modes decoded as one channel


def peek_channels(dataset: str, channels: int = 0) -> int:
    """1 or 3: the channels a source's images will have, read cheaply before loading (``--channels`` when given;
    a built-in dataset's own; an .npz's array header; a folder's first image's mode). 1 where the source cannot
    be read yet: loading it later says why. The default recipe depends on it (``fastclr.recipes``)."""
    if channels:
        return channels
    if dataset in DATASETS or dataset == "kmnist":
        return 1
    if dataset in TORCHVISION:
        return 3
    path = Path(dataset).expanduser()
    try:
        if path.is_file():
            return _npz_channels(path)
        # the first image the walk meets, not the first in sorted order: sorting would list a whole tree first
        first = next((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS), None)
        if first is not None:
            from PIL import Image

            with Image.open(first) as img:
                return 1 if img.mode in GREY_MODES else 3
    except (OSError, ValueError, zipfile.BadZipFile):
        pass
    return 1


def _npz_channels(path: Path) -> int:
    """From the training array's .npy header inside the zip, without reading the array."""
    with zipfile.ZipFile(path) as z:
        for names in NPZ_KEYS:
            member = names["train"] + ".npy"
            if member in z.namelist():
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape = read(f)[0]
                return 3 if len(shape) == 4 and shape[-1] in (3, 4) else 1
    return 1


# --------------------------------------------------------------------------- built-in datasets

def _idx_dataset(spec: SourceSpec) -> ImageData:
    info = dataset_info(spec.dataset)
    train_x, train_y = load_dataset(spec.dataset, spec.data_dir, train=True)
    test_x, test_y = load_dataset(spec.dataset, spec.data_dir, train=False)
    return ImageData(train_x, train_y, test_x, test_y, info.classes, info.mean, info.std)


# name -> (torchvision class, its train / test / pretraining-only keyword arguments)
TORCHVISION = {
    "kmnist": ("KMNIST", dict(train=True), dict(train=False), None),
    "cifar10": ("CIFAR10", dict(train=True), dict(train=False), None),
    "cifar100": ("CIFAR100", dict(train=True), dict(train=False), None),
    "svhn": ("SVHN", dict(split="train"), dict(split="test"), None),
    "stl10": ("STL10", dict(split="train"), dict(split="test"), dict(split="unlabeled")),
}
BUILT_IN = [*DATASETS, *TORCHVISION]


def _torchvision_dataset(spec: SourceSpec, datasets=None) -> ImageData:
    """Through torchvision's class (``datasets``: the module holding it; tests pass a stand-in)."""
    import torchvision.datasets as tvd

    cls_name, train_kw, test_kw, extra_kw = TORCHVISION[spec.dataset]
    cls = getattr(datasets or tvd, cls_name)
    root = resolve_data_dir(spec.data_dir)
    train_x, train_y, classes = tv_tensors(_open_torchvision(cls, root, train_kw, spec.dataset))
    test_x, test_y, _ = tv_tensors(_open_torchvision(cls, root, test_kw, spec.dataset))
    data = ImageData(train_x, train_y, test_x, test_y, classes, 0.0, 1.0)
    if extra_kw is not None:
        extra_x, _, _ = tv_tensors(_open_torchvision(cls, root, extra_kw, spec.dataset))
        data.pretrain_x = torch.cat([train_x, extra_x])
        data.notes.append(f"{spec.dataset}: trains on {len(data.pretrain_x)} images (train + {extra_kw['split']}), "
                          f"evaluates with the labelled train and test splits")
    return data


def _open_torchvision(cls, root: Path, kwargs: dict, name: str):
    try:
        return cls(root=str(root), download=True, **kwargs)
    except Exception as exc:  # URLError, RuntimeError("... corrupted ..."), OSError, ...
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FastclrError(f"{name} is not under {root} and could not be downloaded or checked "
                           f"({type(exc).__name__}: {first}); run once with internet access, or put torchvision's "
                           f"files for {cls.__name__} there (--data-dir / FASTCLR_DATA)") from None


def tv_tensors(ds) -> tuple[Tensor, Tensor | None, tuple[str, ...] | None]:
    """A torchvision dataset's ``data`` and labels as (N, C, H, W) uint8 and (N,) int64 (None where every label is
    -1, STL-10's unlabeled split), with its class names."""
    x = torch.as_tensor(np.asarray(ds.data))
    if x.dim() == 3:                                  # (N, H, W): MNIST-like
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3):                       # (N, H, W, C): CIFAR
        x = x.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    labels = getattr(ds, "labels", None) if labels is None else labels
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64) if labels is not None else None
    if y is not None and bool((y < 0).all()):
        y = None
    classes = getattr(ds, "classes", None)
    if not classes and y is not None:
        classes = [str(i) for i in range(int(y.max()) + 1)]
    return x.to(torch.uint8).contiguous(), y, tuple(classes) if classes else None


# --------------------------------------------------------------------------- .npz files

NPZ_KEYS = ({"train": "train_images", "train_y": "train_labels", "test": "test_images", "test_y": "test_labels",
             "val": "val_images", "val_y": "val_labels"},
            {"train": "x_train", "train_y": "y_train", "test": "x_test", "test_y": "y_test"})


def _npz(path: Path, spec: SourceSpec) -> ImageData:
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FastclrError(f"cannot read {path} as an .npz file ({type(exc).__name__}); check the file") from None
    names = next((k for k in NPZ_KEYS if k["train"] in keys), None)
    if names is None:
        raise FastclrError(f"{path} has no training images: expected the key train_images (MedMNIST) or x_train "
                           f"(Keras); it holds {', '.join(sorted(keys)) or 'nothing'}")
    read = lambda role: _npz_array(z, path, names.get(role)) if names.get(role) in keys else None  # noqa: E731
    notes: list[str] = []
    train_x, train_y = _npz_images(read("train"), path, names["train"], notes), read("train_y")
    test_role = "test" if names.get("test") in keys else ("val" if names.get("val") in keys else None)
    if "val" in names and names["val"] in keys:
        notes.append(f"{path.name}: {names['val']} is " + ("the test split (there is no test_images)"
                                                          if test_role == "val" else "not used (test_images is the "
                                                                                     "test split)"))
    test_x = _npz_images(read(test_role), path, names[test_role], notes) if test_role else None
    test_y = read(test_role + "_y") if test_role else None
    train_y = _npz_labels(train_y, train_x, path, names["train_y"])
    test_y = _npz_labels(test_y, test_x, path, names.get(f"{test_role}_y", "")) if test_x is not None else None
    data = _split_if_needed(ImageData(train_x, train_y, test_x, test_y, None, 0.0, 1.0, notes=notes), spec)
    if data.train_y is not None:
        data.classes = tuple(str(i) for i in range(int(torch.cat([data.train_y, data.test_y]).max()) + 1))
    return data


def _npz_array(z, path: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FastclrError(f"cannot read {key} from {path} ({type(exc).__name__}): the file is damaged") from None


def _npz_images(a: np.ndarray, path: Path, key: str, notes: list[str]) -> Tensor:
    """(N, C, H, W) uint8 from an array of images: uint8 as it is, other integers in [0, 255], floats in [0, 1]
    (x 255, rounded); (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1, 3 or 4. What was converted goes in
    ``notes``; anything else is one line naming the key."""
    a = _as_uint8(a, path, key, notes)
    if a.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)
    if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()
    if a.ndim == 4 and a.shape[1] in (1, 3, 4):     # PyTorch's layout: the last axis is not a channel count
        notes.append(f"{path.name}: {key} read as (N, C, H, W) = {a.shape}")
        return torch.from_numpy(np.ascontiguousarray(a))
    raise FastclrError(f"{path}: {key} has shape {a.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                       "C 1, 3 or 4")


def _as_uint8(a: np.ndarray, path: Path, key: str, notes: list[str]) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    kind = "floats" if np.issubdtype(a.dtype, np.floating) else "integers" if np.issubdtype(a.dtype, np.integer) else None
    if kind is None or a.size == 0:
        raise FastclrError(f"{path}: {key} is {a.dtype}; fastclr reads images as uint8, other integers in [0, 255] "
                           "or floats in [0, 1]")
    top = 1.0 if kind == "floats" else 255
    lo, hi = a.min(), a.max()       # NaN makes both NaN, which fails the check below
    if not (lo >= 0 and hi <= top):
        raise FastclrError(f"{path}: {key} is {a.dtype} with values in [{lo:.4g}, {hi:.4g}]; fastclr reads uint8 images, "
                           f"{'or floats in [0, 1]' if kind == 'floats' else 'or integers in [0, 255]'}: rescale "
                           "them first")
    notes.append(f"{path.name}: {key} is {a.dtype}; read as uint8" + (" (x 255, rounded)" if kind == "floats" else ""))
    if kind == "integers":
        return a.astype(np.uint8)
    # in f32 whatever the input's float type: exact enough for x 255 to round right, half float64's memory
    return np.rint(a.astype(np.float32, copy=False) * np.float32(255)).astype(np.uint8)


def _npz_labels(y: np.ndarray | None, x: Tensor, path: Path, key: str) -> Tensor | None:
    if y is None:
        return None
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1 or len(y) != len(x):
        raise FastclrError(f"{path}: {key} has shape {y.shape} for {len(x)} images; expected ({len(x)},) or "
                           f"({len(x)}, 1)")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise FastclrError(f"{path}: {key} must hold class indices 0, 1, 2, ... (got {y.dtype})")
    return torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- image folders

def _folder(root: Path, spec: SourceSpec) -> ImageData:
    splits, classes, skipped = scan_folder(root)
    every = [p for files in splits.values() for p, _ in files]
    images, notes = decode_images(every, spec, root)
    if skipped:
        notes.append(f"{root}: skipped {skipped} file(s) that are not PNG, JPEG, BMP or WebP images")
    n_train = len(splits["train"])
    labels = {s: torch.tensor([c for _, c in files], dtype=torch.int64) for s, files in splits.items()}
    labelled = classes is not None
    test = splits.get("test")
    data = ImageData(images[:n_train], labels["train"] if labelled else None,
                     images[n_train:] if test else None, labels["test"] if test and labelled else None,
                     classes, 0.0, 1.0, notes=notes)
    return _split_if_needed(data, spec)


def scan_folder(root: Path) -> tuple[dict[str, list[tuple[str, int]]], tuple[str, ...] | None, int]:
    """The image files of each split with their class index, the class names (None: unlabeled) and the count of
    files skipped. FastclrError for an empty folder or a class folder with no images."""
    split_dirs = {"train": root / "train"}
    if (root / "train").is_dir():
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        if test_dir.is_dir():
            split_dirs["test"] = test_dir
    else:
        split_dirs = {"train": root}
    classes = _class_names(split_dirs["train"])
    splits, skipped = {}, 0
    for name, d in split_dirs.items():
        splits[name], n = _split_files(d, classes)
        skipped += n
    if classes is not None and "test" in splits:
        extra = set(_class_names(split_dirs["test"]) or ()) - set(classes)
        if extra:
            raise FastclrError(f"{split_dirs['test']} has class folders that {split_dirs['train']} lacks: "
                               f"{', '.join(sorted(extra))}")
    return splits, classes, skipped


def _class_names(d: Path) -> tuple[str, ...] | None:
    subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return tuple(subdirs) or None


def _split_files(d: Path, classes) -> tuple[list[tuple[str, int]], int]:
    files, skipped = [], 0
    for c, folder in enumerate([d / name for name in classes] if classes else [d]):
        if not folder.is_dir():
            continue
        # os.scandir and plain strings: the entry's type comes with the listing, so 70,000 files cost no stat
        # calls and no Path objects here
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))
        base = str(folder)
        images = [os.path.join(base, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
        skipped += len(names) - len(images)
        if not images:
            raise FastclrError(f"{folder} holds no PNG, JPEG, BMP or WebP images; remove it or add images")
        files += [(f, c) for f in images]
    return files, skipped


def _decode_one(args) -> np.ndarray | str:
    """One image as (H, W) or (H, W, 3) uint8, resized to ``size`` (0: as stored); an error message instead of
    raising, so a worker process reports the file."""
    from PIL import Image, UnidentifiedImageError

    path, size, channels = args
    try:
        with Image.open(path) as img:
            img.load()
            mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if img.mode in GREY_MODES else "RGB")
            img = img.convert(mode)
            if size:
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"


def decode_images(paths: list[str], spec: SourceSpec, root: Path) -> tuple[Tensor, list[str]]:
    """Every file as one (N, C, H, W) uint8 tensor, in worker processes, or from the cache."""
    key = _cache_key(paths, spec)
    cache = _cache_dir() / f"{key}.pt"
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=True), [f"{root}: {len(paths)} images from the decoding cache"]
        except Exception:
            cache.unlink(missing_ok=True)
    _check_decoding_memory(paths, spec)
    jobs = [(p, spec.image_size, spec.channels) for p in paths]
    workers = min(os.cpu_count() or 1, 8)
    if workers > 1 and len(jobs) > 256:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_decode_one, jobs, chunksize=512))
    else:
        arrays = [_decode_one(j) for j in jobs]
    bad = next((a for a in arrays if isinstance(a, str)), None)
    if bad is not None:
        raise FastclrError(f"cannot decode {bad}; replace or remove the file")
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) > 1:
        found = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sizes.most_common(5))
        raise FastclrError(f"{root} holds images of {len(sizes)} sizes ({found}); pass --image-size N to resize "
                           "every image to N x N at load")
    colour = any(a.ndim == 3 for a in arrays)
    stacked = np.stack([np.repeat(a[..., None], 3, -1) if colour and a.ndim == 2 else a for a in arrays])
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2) if colour else torch.from_numpy(stacked).unsqueeze(1)
    images = images.contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(images, tmp)
    tmp.replace(cache)
    return images, [f"{root}: decoded {len(paths)} images ({workers} processes); cached in {cache.parent}"]


def _check_decoding_memory(paths: list[str], spec: SourceSpec) -> None:
    """Before decoding: the bytes the images will take (from the first image's size and mode; twice, since the
    decoded arrays are stacked into one tensor) against the host's available memory."""
    from PIL import Image

    from .backend import free_memory

    try:
        with Image.open(paths[0]) as img:
            (w, h), colour = img.size, img.mode not in ("L", "1", "I", "I;16", "F", "LA")
    except OSError:
        return                      # the decoder names the file
    c = spec.channels or (3 if colour else 1)
    side = (spec.image_size, spec.image_size) if spec.image_size else (h, w)
    need, free = 2 * len(paths) * c * side[0] * side[1], free_memory(torch.device("cpu"))
    if free is not None and need > free:
        raise FastclrError(f"decoding {len(paths)} images of {c}x{side[0]}x{side[1]} needs about {need / 2**30:.2f} "
                           f"GiB of memory and {free / 2**30:.2f} GiB are available; pass a smaller --image-size "
                           "or use fewer images")


def _cache_key(paths: list[str], spec: SourceSpec) -> str:
    """Every file's path, size and modification time, and the settings that change the decoded tensor."""
    h = hashlib.sha256(f"{CACHE_VERSION} {spec.image_size} {spec.channels} {os.path.abspath(paths[0])}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _cache_dir() -> Path:
    from .kernels import cache_dir

    return cache_dir() / "decoded"


# --------------------------------------------------------------------------- the shared last steps

def _split_if_needed(data: ImageData, spec: SourceSpec) -> ImageData:
    """A labelled source without a test split: a stratified, seeded ``test_fraction`` of each class becomes it."""
    if data.test_x is not None or data.train_y is None:
        return data
    g = torch.Generator().manual_seed(spec.seed)
    test = torch.zeros(len(data.train_y), dtype=torch.bool)
    for c in data.train_y.unique():
        idx = (data.train_y == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: max(1, round(spec.test_fraction * len(idx)))] if len(idx) > 1 else idx[:0]] = True
    data.notes.append(f"no test split: {int(test.sum())} images ({spec.test_fraction:.0%} of each class, seed "
                      f"{spec.seed}) held out for evaluation")
    x, y = data.train_x, data.train_y
    data.train_x, data.train_y, data.test_x, data.test_y = x[~test], y[~test], x[test], y[test]
    return data


def _finish(data: ImageData, spec: SourceSpec) -> ImageData:
    """Channels and size as asked, RGBA -> RGB, per-channel statistics for every source but MNIST's two."""
    for name in ("train_x", "test_x", "pretrain_x"):
        x = getattr(data, name)
        if x is not None:
            setattr(data, name, _conform(x, spec))
    if spec.dataset not in DATASETS:
        data.mean, data.std = pixel_stats(data.pretrain_x if data.pretrain_x is not None else data.train_x)
    return data


def _conform(x: Tensor, spec: SourceSpec) -> Tensor:
    if x.shape[1] == 4:                              # RGBA: drop alpha
        x = x[:, :3]
    if spec.channels == 1 and x.shape[1] == 3:       # ITU-R 601 luma, as PIL's convert("L")
        x = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round()
    elif spec.channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if spec.image_size and tuple(x.shape[-2:]) != (spec.image_size, spec.image_size):
        x = torch.nn.functional.interpolate(x.float(), size=(spec.image_size,) * 2, mode="bilinear",
                                            antialias=True, align_corners=False).round().clamp(0, 255)
    return x.to(torch.uint8).contiguous()


def pixel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) as [0, 1] values, exactly (float64) from each
    channel's 256-bin histogram: one counting pass instead of float copies of the whole set."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        m = float((counts * levels).sum() / n)
        var = float((counts * (levels - m) ** 2).sum() / n)
        mean.append(round(m, 6))
        std.append(round(max(var, 1e-12) ** 0.5, 6))
    return tuple(mean), tuple(std)
