"""Write datasets out as a user would hand them to fastclr: a PNG folder tree and a MedMNIST-style .npz.

    python -m benchmarks.export fashion-mnist --png DIR --npz FILE [--data-dir DIR]
    python -m benchmarks.export digits --npz FILE          # scikit-learn's bundled 8x8 digits (offline)
    python -m benchmarks.export fashion-mnist --size 32 --tint ink --npz FILE    # a colour set (below)

The folder tree is ``train/<class>/NNNNN.png`` and ``test/<class>/NNNNN.png``; the .npz holds ``train_images``
(N, H, W) uint8, ``train_labels`` (N, 1), ``test_images`` and ``test_labels``. Used to check that a source read
from files trains as the built-in dataset does (docs/recipe.md, "Your own data").
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def splits(name: str, data_dir: str | None) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{"train": (images (N, H, W) uint8, labels (N,), class names), "test": ...}"""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = (d.images * 16).clip(0, 255).astype(np.uint8)       # 0-16 grey levels -> 0-255
        g = np.random.default_rng(0)
        test = np.zeros(len(x), bool)
        test[g.permutation(len(x))[: len(x) // 5]] = True
        classes = [str(c) for c in range(10)]
        return {"train": (x[~test], d.target[~test], classes), "test": (x[test], d.target[test], classes)}
    from fastclr.data import dataset_info, load_dataset

    classes = list(dataset_info(name).classes)
    out = {}
    for split, train in (("train", True), ("test", False)):
        x, y = load_dataset(name, data_dir, train=train)
        out[split] = (x[:, 0].numpy(), y.numpy(), classes)
    return out


def random_colours(n: int, value: tuple[float, float], g: np.random.Generator) -> np.ndarray:
    """(n, 3) RGB in [0, 1]: hue U(0, 1), saturation U(0.5, 1), value U(*value) (HSV, as colorsys)."""
    h, s, v = g.random(n), g.uniform(0.5, 1.0, n), g.uniform(*value, n)
    k = (np.array([5.0, 3.0, 1.0]) + 6 * h[:, None]) % 6
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def tint(x: np.ndarray, scheme: str, seed: int) -> np.ndarray:
    """(N, H, W) uint8 grey -> (N, H, W, 3) uint8 colour, one random colouring per image (see the docstring)."""
    g = np.random.default_rng(seed)
    a = x.astype(np.float32)[..., None] / 255
    if scheme == "ink":
        out = a * random_colours(len(x), (1.0, 1.0), g)[:, None, None]
    elif scheme == "duotone":
        bg, fg = random_colours(len(x), (0.0, 0.4), g), random_colours(len(x), (0.8, 1.0), g)
        out = (1 - a) * bg[:, None, None] + a * fg[:, None, None]
    else:
        raise ValueError(f"unknown tint {scheme!r}")
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size), bilinear with antialiasing (as fastclr's --image-size)."""
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None].float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return t.round().clamp(0, 255)[:, 0].to(torch.uint8).numpy()


def _write_png(args) -> None:
    from PIL import Image

    path, img = args
    Image.fromarray(img).save(path)


def write_png_tree(root: Path, data: dict) -> float:
    """Returns the seconds it took."""
    t = time.perf_counter()
    jobs = []
    for split, (x, y, classes) in data.items():
        for c in classes:
            (root / split / c.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        jobs += [(root / split / classes[label].replace("/", "-") / f"{i:05d}.png", img)
                 for i, (img, label) in enumerate(zip(x, y))]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_write_png, jobs, chunksize=1000))
    return time.perf_counter() - t


def write_npz(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"{split}_images": x for split, (x, _, _) in data.items()},
             **{f"{split}_labels": y[:, None] for split, (_, y, _) in data.items()})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["mnist", "fashion-mnist", "digits"])
    p.add_argument("--png", default=None, help="write the PNG folder tree here")
    p.add_argument("--npz", default=None, help="write the .npz here")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--size", type=int, default=0, help="resize to N x N first (0: as stored)")
    p.add_argument("--tint", choices=["ink", "duotone"], default=None, help="colour each image at random (docstring)")
    p.add_argument("--seed", type=int, default=0, help="the tint's seed (the test split uses seed + 1)")
    args = p.parse_args(argv)
    data = splits(args.dataset, args.data_dir)
    for i, (split, (x, y, classes)) in enumerate(data.items()):
        x = resize(x, args.size) if args.size else x
        data[split] = (tint(x, args.tint, args.seed + i) if args.tint else x, y, classes)
    if args.png:
        print(f"wrote {sum(len(x) for x, _, _ in data.values())} PNGs under {args.png} in "
              f"{write_png_tree(Path(args.png), data):.1f}s")
    if args.npz:
        write_npz(Path(args.npz), data)
        print(f"wrote {args.npz}")


if __name__ == "__main__":
    main()
