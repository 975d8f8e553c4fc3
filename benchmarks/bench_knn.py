"""k-NN of 10,000 test against 60,000 train samples (128-d and 784-d), per backend, with the matmul floor.

Rows per (device, dim) group:
- fastclr backends through ``knn_predict`` (torch, sklearn, cuml where present), and ``auto``;
- scikit-learn's own ``KNeighborsClassifier(algorithm="brute")``, the usual CPU answer;
- ``floor``: a bare chunked ``test @ train.T`` + ``topk`` of the same shapes, the least any exact k-NN costs.
"""
import pytest
import torch
import torch.nn.functional as F

from fastclr import backend as B
from fastclr.eval import knn_predict

from .conftest import DEVICES, QUICK, describe, run, skip_unless_device

N_TRAIN, N_TEST, K = (6000, 1000, 20) if QUICK else (60000, 10000, 20)
DIMS = [128] if QUICK else [128, 784]


def data(dim, device):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, dim, generator=g)
    y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=g)
    x = centres[y] + 1.5 * torch.randn(N_TRAIN + N_TEST, dim, generator=g)
    x, y = x.to(device), y.to(device)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def floor(train_x, test_x, chunk=1024):
    tr, te = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    return [(q @ tr.T).topk(K, dim=1) for q in te.split(chunk)]


def sklearn_classifier(train_x, train_y, test_x):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(K, metric="cosine", algorithm="brute")
    return clf.fit(train_x.cpu().numpy(), train_y.cpu().numpy()).predict(test_x.cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("impl", ["auto", "torch", "sklearn", "cuml", "sklearn-KNeighborsClassifier", "floor"])
def test_knn(benchmark, impl, dim, device):
    skip_unless_device(device)
    if impl == "cuml" and not (device == "cuda" and B.cuml_available()):
        pytest.skip("cuML needs a CUDA device and `pip install fastclr[gpu]`")
    if device == "cuda" and impl.startswith("sklearn"):
        pytest.skip("scikit-learn runs on the CPU: see the cpu group")
    benchmark.group = f"knn-{device}-{N_TEST}x{N_TRAIN}x{dim}"
    describe(benchmark, {"auto": "fastclr auto", "torch": "torch", "sklearn": "sklearn NearestNeighbors",
                         "cuml": "cuML", "sklearn-KNeighborsClassifier": "sklearn KNeighborsClassifier",
                         "floor": "matmul + topk floor"}[impl], baseline=impl == "sklearn-KNeighborsClassifier")
    train_x, train_y, test_x, test_y = data(dim, device)
    if impl == "floor":
        fn = lambda: floor(train_x, test_x)
    elif impl == "sklearn-KNeighborsClassifier":
        fn = lambda: sklearn_classifier(train_x, train_y, test_x)
    else:
        fn = lambda: knn_predict(train_x, train_y, test_x, k=K, metric="cosine", weighting="uniform", backend=impl)
    slow = impl.startswith("sklearn") or dim > 128
    out = run(benchmark, fn, device, rounds=1 if slow else 3, warmup=0 if slow else 1)
    benchmark.extra_info["queries_per_second"] = N_TEST / benchmark.stats.stats.mean
    if impl != "floor":  # the predictions of the last timed round: every backend must score alike
        benchmark.extra_info["accuracy"] = (torch.as_tensor(out).cpu() == test_y.cpu()).float().mean().item()
