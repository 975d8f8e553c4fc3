import sys
import types

import numpy as np
import pytest
import torch

from fastclr import backend as B
from fastclr.eval import (knn_accuracy, knn_predict, linear_probe_accuracy, plot_tsne, tsne, vote)


def blobs(n_per, d, classes=3, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 3
    x = torch.cat([centres[c] + spread * torch.randn(n_per, d, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per)
    return x, y


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_separable_blobs_perfect(backend, metric):
    x, y = blobs(50, 8)
    tx, ty = x[::3] + 0.01, y[::3]
    assert knn_accuracy(x, y, tx, ty, k=5, metric=metric, backend=backend) == 1.0


def test_vote_weightings():
    train_y = torch.tensor([0, 1, 1])
    idx = torch.tensor([[0, 1, 2]])
    dist = torch.tensor([[0.1, 0.5, 0.6]])
    assert vote(train_y, dist, idx, 2, "uniform").item() == 1          # 2 votes to 1
    assert vote(train_y, dist, idx, 2, "distance").item() == 0         # 10 > 2 + 1.67
    assert vote(train_y, dist, idx, 2, "exp", temperature=0.07).item() == 0
    exact = torch.tensor([[0.0, 0.5, 0.6]])
    assert vote(train_y, exact, idx, 2, "distance").item() == 0        # an exact match takes all the weight


@pytest.fixture(scope="module")
def real_embeddings(mnist):
    """Embeddings of real MNIST images by a fixed random CNN (20k memory, 5k queries)."""
    from fastclr.eval import embed
    from fastclr.model import Encoder

    torch.manual_seed(0)
    enc = Encoder("cnn", 8, 64)
    dev = torch.device("cpu")
    return (embed(enc, mnist["train_x"][:20000], dev), mnist["train_y"][:20000],
            embed(enc, mnist["test_x"][:5000], dev), mnist["test_y"][:5000])


@pytest.mark.parametrize("metric,weighting", [("cosine", "exp"), ("cosine", "uniform"), ("euclidean", "distance")])
def test_torch_and_sklearn_agree_on_real_embeddings(real_embeddings, metric, weighting):
    tr, try_, te, _ = real_embeddings
    kw = dict(k=20, metric=metric, weighting=weighting)
    a = knn_predict(tr, try_, te, backend="torch", **kw)
    b = knn_predict(tr, try_, te, backend="sklearn", **kw)
    assert (a == b).float().mean().item() >= 0.999


# --------------------------------------------------------------------------- cuML stand-in

def _install_fake_cuml(monkeypatch):
    """A stand-in `cuml` that records how fastclr calls it and answers through scikit-learn."""
    from sklearn.manifold import TSNE as SkTSNE
    from sklearn.neighbors import NearestNeighbors as SkNN

    calls = []

    class NearestNeighbors:
        def __init__(self, **kw):
            calls.append(("NearestNeighbors", kw))
            self.kw = kw

        def fit(self, x):
            calls.append(("fit", type(x), x.dtype, x.is_contiguous()))
            self.nn = SkNN(n_neighbors=self.kw["n_neighbors"], algorithm="brute", metric=self.kw["metric"])
            self.nn.fit(np.asarray(x))
            return self

        def kneighbors(self, x):
            calls.append(("kneighbors", type(x), x.dtype))
            return self.nn.kneighbors(np.asarray(x))

    class TSNE:
        def __init__(self, **kw):
            calls.append(("TSNE", kw))
            self.kw = kw

        def fit_transform(self, x):
            calls.append(("fit_transform", x.shape))
            return SkTSNE(n_components=2, perplexity=self.kw["perplexity"], random_state=0).fit_transform(x)

    cuml = types.ModuleType("cuml")
    neighbors = types.ModuleType("cuml.neighbors")
    manifold = types.ModuleType("cuml.manifold")
    neighbors.NearestNeighbors, manifold.TSNE = NearestNeighbors, TSNE
    cuml.neighbors, cuml.manifold = neighbors, manifold
    for name, mod in (("cuml", cuml), ("cuml.neighbors", neighbors), ("cuml.manifold", manifold)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(B, "cuda_available", lambda: True)
    monkeypatch.setattr(B, "cuml_available", lambda: True)
    return calls


def test_cuml_knn_dispatch_and_argument_conversion(monkeypatch):
    calls = _install_fake_cuml(monkeypatch)
    x, y = blobs(40, 6)
    q = x[::7] + 0.05
    got = knn_predict(x, y, q, k=7, metric="cosine", backend="cuml")
    want = knn_predict(x, y, q, k=7, metric="cosine", backend="torch")
    assert torch.equal(got, want)
    assert calls[0] == ("NearestNeighbors", dict(n_neighbors=7, algorithm="brute", metric="cosine",
                                                 output_type="numpy"))
    assert calls[1] == ("fit", torch.Tensor, torch.float32, True)
    assert calls[2][0] == "kneighbors"


def test_cuml_tsne_dispatch(monkeypatch):
    calls = _install_fake_cuml(monkeypatch)
    x, _ = blobs(30, 64)
    xy = tsne(x, backend="cuml", perplexity=10)
    assert xy.shape == (90, 2)
    assert calls[0] == ("TSNE", dict(n_components=2, perplexity=10, method="fft", random_state=0,
                                     output_type="numpy"))
    assert calls[1] == ("fit_transform", (90, 50))   # PCA to 50 dimensions first


def test_tsne_sklearn_and_plot(tmp_path):
    x, y = blobs(40, 10)
    xy = tsne(x, backend="sklearn", perplexity=15)
    assert xy.shape == (120, 2) and np.isfinite(xy).all()
    plot_tsne(xy, y.numpy(), ["a", "b", "c"], tmp_path / "t.png", "test")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_tsne_of_a_small_set_caps_the_perplexity_and_plots_unlabeled(tmp_path):
    """20 points at the default perplexity 30 (scikit-learn refuses perplexity >= N): capped to (N - 1) / 3."""
    x, _ = blobs(7, 10)
    xy = tsne(x[:20], backend="sklearn")
    assert xy.shape == (20, 2) and np.isfinite(xy).all()
    plot_tsne(xy, None, None, tmp_path / "u.png", "unlabeled")
    assert (tmp_path / "u.png").stat().st_size > 1000


def test_linear_probe_backends_agree_on_blobs():
    x, y = blobs(60, 5, spread=1.5)
    tx, ty = blobs(30, 5, seed=0, spread=1.5)
    a = linear_probe_accuracy(x, y, tx, ty, backend="torch")
    b = linear_probe_accuracy(x, y, tx, ty, backend="sklearn")
    assert a > 0.9 and abs(a - b) <= 0.02


@pytest.mark.slow
def test_linear_probe_on_raw_mnist_pixels(mnist):
    flat = lambda t: t.flatten(1).float() / 255
    acc = linear_probe_accuracy(flat(mnist["train_x"]), mnist["train_y"], flat(mnist["test_x"]), mnist["test_y"])
    assert 0.91 <= acc <= 0.94  # logistic regression on raw pixels: ~92% (LeCun et al.'s table: 92.4%)


def test_bad_knn_arguments():
    x, y = blobs(5, 3)
    with pytest.raises(ValueError, match="metric"):
        knn_predict(x, y, x, metric="manhattan")
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(x, y, x, k=100)
    with pytest.raises(ValueError, match="same D"):
        knn_predict(x, y, x[:, :2], k=3)


@pytest.mark.gpu
def test_real_cuml_matches_torch_on_gpu():
    pytest.importorskip("cuml")
    x, y = blobs(500, 32)
    q = x[::3] + 0.1
    a = knn_predict(x.cuda(), y.cuda(), q.cuda(), k=10, backend="cuml")
    b = knn_predict(x.cuda(), y.cuda(), q.cuda(), k=10, backend="torch")
    assert (a == b).float().mean().item() >= 0.999
    assert tsne(x.cuda(), backend="cuml").shape == (1500, 2)
