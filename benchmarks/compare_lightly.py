"""Side by side: lightly's SimCLR pipeline against fastclr's, on the same network, data, epochs, batch and optimiser.

    pip install --no-deps lightly lightning-utilities     # lightly's transforms, loss and heads, without Lightning
    python -m benchmarks.compare_lightly --dataset mnist --epochs 1
    python -m benchmarks.export fashion-mnist --size 32 --tint ink --npz colour.npz
    python -m benchmarks.compare_lightly --dataset colour.npz --epochs 1

Both sides train the recipe's encoder (``--recipe``, default the source's own: ``mnist``, or ``custom-color`` for a
colour .npz) from the same initial weights, with AdamW and fastclr's warm-up + cosine schedule, bf16 autocast
where the CPU has it, channels_last, the same batch of pairs and the same epochs, in this one process:

* **fastclr**: the pieces ``fastclr.train``'s loop runs (``make_pairs``: the uint8 data on the device and views
  drawn there in blocks; ``build_training``: fastclr's head and NT-Xent, and on a CPU the encoder through
  ``fastclr.kernels``: BatchNorm fused with its pool and ReLU);
* **lightly**: its ``SimCLRTransform`` (set as close to the recipe as it allows; the report lists both, and what it
  cannot express) in a ``DataLoader`` with ``--workers`` processes (default 2) over PIL images, its
  ``SimCLRProjectionHead`` (the same sizes) and its ``NTXentLoss`` (the same temperature), the encoder as
  PyTorch's own layers (with the same bf16 autocast and channels_last, but not fastclr's kernels, which a lightly
  user does not have). lightly normalises in the transform, so its encoder's own normalisation is set to the
  identity while it trains.

Epochs alternate (fastclr's first, then lightly's, and so on), so both see the same machine load. Reported per side:
images per second through the encoder (both views), the epoch's seconds split into data (waiting for the next
batch) and step, and k-NN accuracy (fastclr.eval's protocol: k = 20, cosine, on the encoder features) after the
last epoch. Without lightly the comparison says so in one line and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch


def lightly_available() -> bool:
    try:
        import lightly.loss  # noqa: F401
        import lightly.models.modules  # noqa: F401
        import lightly.transforms  # noqa: F401
    except ImportError:
        return False
    return True


def per_channel(v, channels: int) -> list[float]:
    return [float(v)] * channels if isinstance(v, (int, float)) else [float(c) for c in v]


def lightly_settings(aug, size: int, mean, std, channels: int) -> tuple[dict, list[str]]:
    """SimCLRTransform's arguments closest to fastclr's AugConfig ``aug``, and what it cannot express."""
    kwargs = dict(input_size=size, cj_prob=aug.color_p if aug.has_color_jitter else 0.0, cj_strength=1.0,
                  cj_bright=aug.color_brightness, cj_contrast=aug.color_contrast, cj_sat=aug.color_saturation,
                  cj_hue=aug.color_hue, min_scale=aug.crop_min, random_gray_scale=aug.gray_p,
                  gaussian_blur=aug.blur_p, sigmas=tuple(aug.blur_sigma), vf_prob=0.0, hf_prob=aug.hflip_p,
                  rr_prob=1.0 if aug.degrees else 0.0, rr_degrees=aug.degrees or None,
                  normalize={"mean": per_channel(mean, channels), "std": per_channel(std, channels)})
    missing = [f"{name} {getattr(aug, name)}" for name, off in (
        ("translate", 0.0), ("shear", 0.0), ("thickness_p", 0.0), ("elastic_p", 0.0), ("brightness", 0.0),
        ("contrast", 0.0), ("erase_p", 0.0)) if getattr(aug, name) != off]
    if tuple(aug.zoom) != (1.0, 1.0):
        missing.append(f"zoom {tuple(aug.zoom)}")
    if tuple(aug.crop_ratio) != (0.75, 1.333):
        missing.append(f"crop_ratio {tuple(aug.crop_ratio)}")
    if aug.blur_p:
        missing.append("blur as 3x3 (lightly's PIL blur has radius sigma)")
    return kwargs, missing


class PILTwoViews(torch.utils.data.Dataset):
    """(N, C, H, W) uint8 images served as torchvision datasets do (a PIL image per item), two views each."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        x = self.images[i].numpy()
        img = Image.fromarray(x[0], "L") if x.shape[0] == 1 else Image.fromarray(x.transpose(1, 2, 0), "RGB")
        return self.transform(img)


def lightly_training(cfg, runtime, total_steps: int, data):
    """fastclr's Training with lightly's head and loss, from the same initial encoder weights."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from fastclr.schedule import make_scheduler
    from fastclr.train import build_training

    torch.manual_seed(cfg.seed)
    tr = build_training(cfg, runtime, total_steps, data=data)
    model = tr.model
    model.head = SimCLRProjectionHead(model.encoder.out_dim, cfg.proj_hidden, cfg.proj_dim, batch_norm=cfg.proj_bn)
    model.encoder.mean.zero_()          # lightly's transform normalises; the encoder's own step is the identity
    model.encoder.std.fill_(1.0)
    model.encoder.cpu_kernels = False   # PyTorch's own layers: what a lightly user runs (fastclr's are fastclr's)
    optimizer = runtime.optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    return dataclasses.replace(tr, net=model, optimizer=optimizer,
                               scheduler=make_scheduler(optimizer, cfg.warmup_steps, total_steps, on_device=False),
                               loss_fn=NTXentLoss(temperature=cfg.temperature))


def run_epoch(batches, tr) -> dict:
    """One epoch of ``tr.step`` over ``batches`` (an iterable of view pairs), timing data and step apart."""
    data_s = step_s = 0.0
    pairs = 0
    it = iter(batches)
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            v1, v2 = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        loss = tr.step(v1, v2)
        step_s += time.perf_counter() - t1
        data_s += t1 - t0
        pairs += len(v1)
    seconds = time.perf_counter() - t_start
    return {"seconds": seconds, "data_seconds": data_s, "step_seconds": step_s, "pairs": pairs,
            "images_per_second": 2 * pairs / seconds, "final_loss": float(loss)}


def knn(encoder, data, runtime) -> float:
    from fastclr.eval import embed, knn_accuracy

    train = embed(encoder, data.train_x, runtime.device)
    test = embed(encoder, data.test_x, runtime.device)
    return knn_accuracy(train, data.train_y.to(runtime.device), test, data.test_y.to(runtime.device), k=20)


def compare(dataset: str, epochs: int, recipe: str | None, workers: int, subset: int, data_dir: str | None,
            log=print) -> dict:
    from lightly.transforms import SimCLRTransform

    from fastclr.config import TrainConfig
    from fastclr.sources import SourceSpec, load_source
    from fastclr.train import Dist, build_training, git_commit, make_pairs, setup_runtime, total_steps

    overrides = dict(dataset=dataset, epochs=epochs, train_subset=subset, tsne_points=0)
    if data_dir:
        overrides["data_dir"] = data_dir
    cfg = TrainConfig.from_recipe(recipe, **overrides)
    cfg.validate()
    runtime, _ = setup_runtime(cfg)
    data = load_source(SourceSpec.of(cfg))
    train_x = data.train_x[:subset] if subset else data.train_x
    c, h, w = train_x.shape[1:]
    size = tuple(train_x.shape[-2:])

    torch.manual_seed(cfg.seed)
    pairs = make_pairs(cfg, train_x, runtime, Dist())
    steps = total_steps(cfg, len(pairs))
    fast = build_training(cfg, runtime, steps, data=data)
    slow = lightly_training(cfg, runtime, steps, data)
    kwargs, missing = lightly_settings(cfg.augment.scaled_to(size), h, data.mean, data.std, c)
    transform = SimCLRTransform(**kwargs)
    loader = torch.utils.data.DataLoader(PILTwoViews(train_x, transform), batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True)
    log(f"{cfg.arch} (width {cfg.width}, embed {cfg.embed_dim}), head {cfg.proj_hidden}-{cfg.proj_dim}, "
        f"{len(train_x)} images of {c}x{h}x{w}, batch {cfg.batch_size}, {epochs} epoch(s), AdamW lr {cfg.lr}, "
        f"{runtime.amp_note}, {torch.get_num_threads()} threads; lightly: {workers} DataLoader workers, "
        f"PyTorch's layers; fastclr: {'its CPU kernels' if fast.model.encoder.cpu_kernels else 'PyTorch layers'}")
    log(f"fastclr augmentation (recipe {cfg.recipe}): {dataclasses.asdict(cfg.augment)}")
    log(f"lightly SimCLRTransform: {kwargs}")
    log(f"not in SimCLRTransform: {', '.join(missing) or 'nothing'}")

    epochs_out = {"fastclr": [], "lightly": []}
    for epoch in range(epochs):
        for side, tr, batches in (("fastclr", fast, pairs.iterate()), ("lightly", slow, loader)):
            tr.model.train()
            r = run_epoch(batches, tr)
            epochs_out[side].append(r)
            log(f"epoch {epoch + 1} {side}: {r['images_per_second']:.0f} images/s, {r['seconds']:.1f} s "
                f"(data {r['data_seconds']:.1f} s, step {r['step_seconds']:.1f} s), loss {r['final_loss']:.3f}")
    slow.model.encoder.mean.copy_(fast.model.encoder.mean)      # back to the data's statistics: raw [0, 1] input
    slow.model.encoder.std.copy_(fast.model.encoder.std)
    result = {"dataset": dataset, "recipe": cfg.recipe, "epochs": epochs, "images": len(train_x),
              "shape": [c, h, w], "batch_size": cfg.batch_size, "arch": cfg.arch, "width": cfg.width,
              "embed_dim": cfg.embed_dim, "workers": workers, "threads": torch.get_num_threads(),
              "precision": runtime.amp_note, "lightly_transform": kwargs, "lightly_cannot": missing,
              "fastclr_cpu_kernels": fast.model.encoder.cpu_kernels, "lightly_layers": "PyTorch's",
              "fastclr_augment": dataclasses.asdict(cfg.augment), "commit": git_commit()}
    for side, tr in (("fastclr", fast), ("lightly", slow)):
        runs = epochs_out[side]
        total = sum(r["seconds"] for r in runs)
        result[side] = {"epochs": runs, "images_per_second": 2 * sum(r["pairs"] for r in runs) / total,
                        "data_seconds": sum(r["data_seconds"] for r in runs),
                        "step_seconds": sum(r["step_seconds"] for r in runs),
                        "knn_accuracy": knn(tr.model.encoder, data, runtime) if data.labelled else None}
    result["speedup"] = result["fastclr"]["images_per_second"] / result["lightly"]["images_per_second"]
    return result


def report(r: dict) -> str:
    rows = [f"| {side} | {r[side]['images_per_second']:.0f} | {r[side]['data_seconds']:.1f} | "
            f"{r[side]['step_seconds']:.1f} | {r[side]['knn_accuracy']:.4f} |" for side in ("fastclr", "lightly")]
    return "\n".join([
        f"{r['dataset']} ({r['images']} images of {'x'.join(map(str, r['shape']))}), recipe {r['recipe']}, "
        f"{r['arch']} width {r['width']}, batch {r['batch_size']}, {r['epochs']} epoch(s), {r['threads']} threads",
        "", "| pipeline | images/s | data s | step s | k-NN |", "| --- | ---: | ---: | ---: | ---: |", *rows, "",
        f"fastclr / lightly: {r['speedup']:.2f}x images/s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="a built-in dataset or a path, as fastclr.train's --dataset")
    p.add_argument("--recipe", default=None, help="fastclr recipe (default: the source's own)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="lightly's DataLoader worker processes")
    p.add_argument("--subset", type=int, default=0, help="train on the first N images only (0: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    if not lightly_available():
        print("compare_lightly: skipped, lightly is not installed (pip install --no-deps lightly lightning-utilities)")
        return 0
    r = compare(args.dataset, args.epochs, args.recipe, args.workers, args.subset, args.data_dir)
    print(report(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
