"""Evaluation of frozen embeddings: k-NN accuracy, linear probe, t-SNE plot.

Standard protocol: the 60,000 training images are the k-NN memory (and the probe's training set), all
10,000 test images are scored. Backends are small tables with one signature; which entry runs is decided
in :mod:`fastclr.backend`. cuML is imported inside its entries only.

k-NN follows DINO's ``eval_knn``: cosine similarity, the k nearest neighbours vote with weight
``exp(sim / T)`` (k=20, T=0.07 by default). The backends differ only in the neighbour *search*; the vote is
one torch function, so every backend scores with identical rules.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import FastclrError
from .backend import (Runtime, make_runtime, resolve_knn_backend, resolve_probe_backend,
                      resolve_tsne_backend)

METRICS = ("cosine", "euclidean")
WEIGHTINGS = ("exp", "distance", "uniform")


# --------------------------------------------------------------------------- embeddings

@torch.no_grad()
def embed(encoder: torch.nn.Module, images: Tensor, device: torch.device, batch_size: int = 2048,
          autocast=None) -> Tensor:
    """Encoder outputs for a uint8 image tensor, in eval mode, as fp32 on ``device``.

    Shape:
        images: (N, 1, 28, 28) uint8. Output: (N, D) float32.
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device, non_blocking=True).float().div_(255)
        with autocast or torch.autocast(device_type=device.type, enabled=False):
            out.append(encoder(x).float())
    encoder.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------- k-NN: neighbour search

def _search_torch(train_x: Tensor, test_x: Tensor, k: int, metric: str, chunk: int = 1024):
    """Chunked ``test @ train.T`` + ``topk``: memory O(chunk * N_train), whatever the test size.

    Returns distances (Q, k) ascending (cosine: 1 - cos) and indices (Q, k)."""
    if metric == "cosine":
        train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    else:
        train_sq = (train_x * train_x).sum(1)
    dists, idxs = [], []
    for q in test_x.split(chunk):
        sim = q @ train_x.T                                          # (chunk, N_train)
        if metric == "cosine":
            top, idx = sim.topk(k, dim=1)
            dists.append(1.0 - top)
        else:  # ||q - x||^2 = ||q||^2 - 2 q.x + ||x||^2, ranked without the constant ||q||^2
            top, idx = (2 * sim - train_sq).topk(k, dim=1)
            dists.append(((q * q).sum(1, keepdim=True) - top).clamp_min_(0).sqrt_())
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def _search_sklearn(train_x: Tensor, test_x: Tensor, k: int, metric: str):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric)
    nn.fit(train_x.cpu().numpy())
    d, i = nn.kneighbors(test_x.cpu().numpy())
    return torch.from_numpy(d).float(), torch.from_numpy(i)


def _search_cuml(train_x: Tensor, test_x: Tensor, k: int, metric: str):
    # cuML reads CUDA tensors through __cuda_array_interface__ without a copy; only (Q, k) comes back.
    from cuml.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric, output_type="numpy")
    nn.fit(train_x.float().contiguous())
    d, i = nn.kneighbors(test_x.float().contiguous())
    return torch.as_tensor(np.asarray(d), dtype=torch.float32), torch.as_tensor(np.asarray(i), dtype=torch.int64)


NEIGHBOUR_SEARCH = {"torch": _search_torch, "sklearn": _search_sklearn, "cuml": _search_cuml}


def vote(train_y: Tensor, dist: Tensor, idx: Tensor, num_classes: int, weighting: str = "exp",
         temperature: float = 0.07) -> Tensor:
    """Weighted k-NN vote; ties go to the lowest class index (as scikit-learn's argmax).

    weighting: ``exp`` = exp(-d / T) (DINO's exp(sim / T) for cosine), ``distance`` = 1 / d (scikit-learn's
    'distance'; exact matches take all the weight), ``uniform`` = 1.

    Shape:
        train_y: (N_train,), dist, idx: (Q, k). Output: (Q,) int64.
    """
    dist, idx = dist.to(train_y.device), idx.to(train_y.device)
    if weighting == "uniform":
        w = torch.ones_like(dist)
    elif weighting == "distance":
        exact = dist <= 0
        w = torch.where(exact.any(1, keepdim=True), exact.to(dist.dtype), 1.0 / dist.clamp_min(1e-12))
    else:
        w = torch.exp(-dist / temperature)
    scores = torch.zeros(dist.shape[0], num_classes, dtype=w.dtype, device=w.device)
    scores.scatter_add_(1, train_y[idx], w)
    return scores.argmax(1)


def _check_knn_args(train_x, train_y, test_x, k, metric, weighting):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not 1 <= k <= len(train_x):
        raise ValueError(f"k must be in [1, {len(train_x)}], got {k}")
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x and test_x must be (N, D) with the same D; got {tuple(train_x.shape)}, "
                         f"{tuple(test_x.shape)}")
    if len(train_y) != len(train_x):
        raise ValueError(f"train_y has {len(train_y)} labels for {len(train_x)} samples")


def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int = 20, metric: str = "cosine",
                weighting: str = "exp", temperature: float = 0.07, backend: str = "auto") -> Tensor:
    """Predict test labels by a weighted vote of the k nearest training samples (classes 0 .. max label).

    Shape:
        train_x: (N, D), train_y: (N,), test_x: (Q, D). Output: (Q,) int64 on train_y's device.
    """
    _check_knn_args(train_x, train_y, test_x, k, metric, weighting)
    name = resolve_knn_backend(backend, train_x.device)
    dist, idx = NEIGHBOUR_SEARCH[name](train_x, test_x, k, metric)
    return vote(train_y, dist, idx, int(train_y.max()) + 1, weighting, temperature)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, **kwargs) -> float:
    pred = knn_predict(train_x, train_y, test_x, **kwargs)
    return (pred.cpu() == test_y.cpu()).float().mean().item()


# --------------------------------------------------------------------------- linear probe

def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def _probe_torch(train_x, train_y, test_x, num_classes, max_iter: int = 100, weight_decay: float = 1e-4):
    """Multinomial logistic regression by full-batch L-BFGS (a convex problem: no lr to tune)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(train_x), train_y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return layer(test_x).argmax(1)


def _probe_sklearn(train_x, train_y, test_x, num_classes, max_iter: int = 100, weight_decay: float = 1e-4):
    from sklearn.linear_model import LogisticRegression

    # scikit-learn's C multiplies the *summed* loss; our weight_decay adds to the *mean* loss
    clf = LogisticRegression(C=1.0 / (2 * weight_decay * len(train_x)), max_iter=max_iter)
    clf.fit(train_x.cpu().numpy(), train_y.cpu().numpy())
    return torch.from_numpy(clf.predict(test_x.cpu().numpy()))


PROBES = {"torch": _probe_torch, "sklearn": _probe_sklearn}


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                          backend: str = "auto", max_iter: int = 100) -> float:
    """Accuracy of a logistic regression on frozen, standardised features. Shapes as :func:`knn_predict`."""
    name = resolve_probe_backend(backend)
    tr, te = _standardise(train_x.float(), test_x.float())
    num_classes = int(train_y.max()) + 1
    pred = PROBES[name](tr, train_y.to(tr.device), te, num_classes, max_iter=max_iter)
    return (pred.cpu() == test_y.cpu()).float().mean().item()


# --------------------------------------------------------------------------- t-SNE

def pca(x: Tensor, dim: int = 50) -> Tensor:
    """Exact PCA to ``dim`` components (the usual step before t-SNE: faster, and denoised). (N, D) -> (N, dim)."""
    if x.shape[1] <= dim:
        return x
    xc = x - x.mean(0)
    _, _, vh = torch.linalg.svd(xc.double(), full_matrices=False)
    return (xc.double() @ vh[:dim].T).float()


def _tsne_sklearn(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _tsne_cuml(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from cuml.manifold import TSNE

    return np.asarray(TSNE(n_components=2, perplexity=perplexity, method="fft", random_state=seed,
                           output_type="numpy").fit_transform(x))


TSNE_BACKENDS = {"sklearn": _tsne_sklearn, "cuml": _tsne_cuml}


def tsne(x: Tensor, backend: str = "auto", perplexity: float = 30.0, seed: int = 0, pca_dim: int = 50) -> np.ndarray:
    """2-D t-SNE of embeddings (PCA to ``pca_dim`` first). (N, D) -> (N, 2) numpy. The perplexity is capped at
    (N - 1) / 3 (t-SNE needs about three times as many neighbours as the perplexity), so a small set still plots."""
    name = resolve_tsne_backend(backend, x.device)
    pts = pca(x.float(), pca_dim).cpu().numpy().astype(np.float32)
    return TSNE_BACKENDS[name](pts, min(perplexity, max(1.0, (len(pts) - 1) / 3)), seed)


def plot_tsne(xy: np.ndarray, labels: np.ndarray | None, class_names, path: Path, title: str) -> None:
    """The 2-D points coloured by class (``labels`` None: unlabeled data, one colour and no legend); more than 20
    classes share tab20's colours and the legend is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color="tab:blue", alpha=0.6)
    else:
        names = list(class_names or (str(c) for c in range(int(labels.max()) + 1)))
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for c, name in enumerate(names):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(c % cmap.N), label=name, alpha=0.8)
        if len(names) <= 20:
            ax.legend(markerscale=4, fontsize=8, loc="best", frameon=True)
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the whole evaluation

def evaluate(encoder, data: dict, runtime: Runtime, cfg, out_dir: Path | None = None, log=print) -> dict:
    """Embed train and test, then k-NN, raw-pixel k-NN, linear probe and t-SNE (each timed), as the run's
    TrainConfig ``cfg`` says (``knn_k``, ``knn_temperature``, ``pixel_knn``, ``linear_probe``, ``tsne_points``,
    ``seed``); the t-SNE plot only with an ``out_dir``.

    ``data`` holds uint8 ``train_x``, ``test_x`` (N, C, H, W), ``train_y``, ``test_y`` and ``classes``.
    """
    k, knn_temperature, seed = cfg.knn_k, cfg.knn_temperature, cfg.seed
    dev = runtime.device
    if data["train_y"] is None or data["test_y"] is None:
        return _evaluate_unlabeled(encoder, data, runtime, cfg, out_dir, log)
    metrics: dict = {}
    t0 = time.perf_counter()
    train_h = embed(encoder, data["train_x"], dev, autocast=runtime.autocast())
    test_h = embed(encoder, data["test_x"], dev, autocast=runtime.autocast())
    train_y, test_y = data["train_y"].to(dev), data["test_y"].to(dev)
    knn_kw = dict(k=k, metric="cosine", weighting="exp", temperature=knn_temperature,
                  backend=runtime.knn_backend)
    metrics["knn_accuracy"] = knn_accuracy(train_h, train_y, test_h, test_y, **knn_kw)
    metrics["knn_seconds"] = time.perf_counter() - t0
    log(f"k-NN accuracy (k={k}, cosine, exp(sim/{knn_temperature}) votes, {runtime.knn_backend}): "
        f"{metrics['knn_accuracy']:.4f}  [{metrics['knn_seconds']:.1f}s]")
    if cfg.pixel_knn:
        t0 = time.perf_counter()
        flat = lambda x: x.to(dev).flatten(1).float().div_(255)
        metrics["pixel_knn_accuracy"] = knn_accuracy(flat(data["train_x"]), train_y, flat(data["test_x"]),
                                                     test_y, **knn_kw)
        metrics["pixel_knn_seconds"] = time.perf_counter() - t0
        log(f"raw-pixel k-NN accuracy (same protocol): {metrics['pixel_knn_accuracy']:.4f}  "
            f"[{metrics['pixel_knn_seconds']:.1f}s]")
    if cfg.linear_probe:
        t0 = time.perf_counter()
        metrics["linear_probe_accuracy"] = linear_probe_accuracy(train_h, train_y, test_h, test_y,
                                                                 backend=runtime.probe_backend)
        metrics["linear_probe_seconds"] = time.perf_counter() - t0
        log(f"linear probe accuracy ({runtime.probe_backend}): {metrics['linear_probe_accuracy']:.4f}  "
            f"[{metrics['linear_probe_seconds']:.1f}s]")
    if cfg.tsne_points and out_dir is not None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        sub = torch.randperm(len(test_h), generator=g)[:cfg.tsne_points].to(dev)
        xy = tsne(test_h[sub], backend=runtime.tsne_backend, seed=seed)
        plot_tsne(xy, test_y[sub].cpu().numpy(), data["classes"], out_dir / "tsne.png",
                  f"t-SNE of {len(sub)} test embeddings (k-NN acc {metrics['knn_accuracy']:.4f})")
        metrics["tsne_seconds"] = time.perf_counter() - t0
        log(f"t-SNE of {len(sub)} test points ({runtime.tsne_backend}) -> {out_dir / 'tsne.png'}  "
            f"[{metrics['tsne_seconds']:.1f}s]")
    return metrics


def _evaluate_unlabeled(encoder, data: dict, runtime: Runtime, cfg, out_dir: Path | None, log) -> dict:
    """No labels: k-NN and the linear probe cannot be scored, so only the t-SNE plot of training embeddings."""
    log("k-NN, raw-pixel k-NN and the linear probe skipped: the data has no labels (or no test split)")
    metrics = {"evaluation_skipped": "no labels"}
    if cfg.tsne_points and out_dir is not None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed)
        sub = torch.randperm(len(data["train_x"]), generator=g)[:cfg.tsne_points]
        h = embed(encoder, data["train_x"][sub], runtime.device, autocast=runtime.autocast())
        plot_tsne(tsne(h, backend=runtime.tsne_backend, seed=cfg.seed), None, None, out_dir / "tsne.png",
                  f"t-SNE of {len(sub)} training embeddings (unlabeled)")
        metrics["tsne_seconds"] = time.perf_counter() - t0
        log(f"t-SNE of {len(sub)} training points ({runtime.tsne_backend}) -> {out_dir / 'tsne.png'}  "
            f"[{metrics['tsne_seconds']:.1f}s]")
    return metrics


# --------------------------------------------------------------------------- CLI

# the run settings fastclr.eval takes; each defaults to the checkpoint's value (--dataset: the source the run
# trained on; --device: auto, as a checkpoint moves between machines)
EVAL_SETTINGS = ("dataset", "data_dir", "device", "amp", "knn_k", "knn_temperature", "knn_backend", "tsne_backend",
                 "probe_backend", "tsne_points", "pixel_knn", "linear_probe")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_setting_flags

    p = argparse.ArgumentParser(prog="python -m fastclr.eval",
                                description="Re-evaluate a saved fastclr checkpoint (k-NN, linear probe, t-SNE). "
                                            "Every setting defaults to the saved run's.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by fastclr.train")
    p.add_argument("--out", default=None, help="folder for metrics.json and tsne.png (default: the checkpoint's folder, "
                                               "metrics written as eval_metrics.json)")
    add_setting_flags(p, EVAL_SETTINGS, defaults={k: None for k in EVAL_SETTINGS if k != "device"})
    return p


def eval_config(args: argparse.Namespace, saved: dict):
    """The saved run's TrainConfig with the settings given on the command line over it."""
    import dataclasses

    from .config import TrainConfig

    cfg = TrainConfig.from_dict(saved, ignore_unknown=True)
    return dataclasses.replace(cfg, **{k: getattr(args, k) for k in EVAL_SETTINGS if getattr(args, k) is not None})


def run_eval(args: argparse.Namespace) -> dict:
    from .checkpoint import read_checkpoint, saved_config
    from .model import load_encoder
    from .sources import SourceSpec, load_source

    cfg = eval_config(args, saved_config(read_checkpoint(args.checkpoint)))
    runtime = make_runtime(cfg.device, amp=cfg.amp, knn_backend=cfg.knn_backend, tsne_backend=cfg.tsne_backend,
                           probe_backend=cfg.probe_backend)
    try:
        source = load_source(SourceSpec.of(cfg))
    except FastclrError as exc:
        if args.dataset is not None:
            raise
        raise FastclrError(f"{exc} (the saved run's data: pass --data to say where it is now)") from None
    for note in source.notes:
        print(note)
    data = source.for_eval()
    encoder = load_encoder(args.checkpoint).to(runtime.device)
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(encoder, data, runtime, cfg, out_dir)
    metrics.update(checkpoint=str(args.checkpoint), runtime=runtime.describe(), torch_version=torch.__version__)
    name = "metrics.json" if args.out else "eval_metrics.json"
    (out_dir / name).write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out_dir / name}")
    return metrics


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_eval(args)
    except FastclrError as exc:
        print(f"fastclr.eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
