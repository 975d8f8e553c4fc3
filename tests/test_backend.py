import pytest
import torch

from fastclr import backend as B
from fastclr.backend import FastclrError


@pytest.fixture
def probes(monkeypatch):
    """Force the probe results: probes(cuda=..., cuml=...)."""
    for var in ("FASTCLR_DEVICE", "FASTCLR_KNN_BACKEND", "FASTCLR_TSNE_BACKEND", "FASTCLR_PROBE_BACKEND"):
        monkeypatch.delenv(var, raising=False)

    def set_(cuda: bool, cuml: bool):
        monkeypatch.setattr(B, "cuda_available", lambda: cuda)
        monkeypatch.setattr(B, "cuml_available", lambda: cuml and cuda)

    return set_


@pytest.mark.parametrize("cuda,cuml,device,knn,tsne", [
    (False, False, "cpu", "torch", "sklearn"),
    (True, False, "cuda", "torch", "sklearn"),
    (True, True, "cuda", "cuml", "cuml"),
])
def test_auto_resolution(probes, cuda, cuml, device, knn, tsne):
    probes(cuda, cuml)
    dev = B.resolve_device("auto")
    assert dev.type == device
    assert B.resolve_knn_backend("auto", dev) == knn
    assert B.resolve_tsne_backend("auto", dev) == tsne
    assert B.resolve_probe_backend("auto") == "torch"


def test_auto_on_cpu_device_never_picks_cuml_even_when_installed(probes):
    probes(True, True)
    assert B.resolve_knn_backend("auto", torch.device("cpu")) == "torch"
    assert B.resolve_tsne_backend("auto", torch.device("cpu")) == "sklearn"


def test_overrides_by_argument_and_environment(probes, monkeypatch):
    probes(False, False)
    assert B.resolve_knn_backend("sklearn") == "sklearn"
    monkeypatch.setenv("FASTCLR_KNN_BACKEND", "sklearn")
    assert B.resolve_knn_backend(None) == "sklearn"
    assert B.resolve_knn_backend("torch") == "torch"  # the flag beats the environment
    monkeypatch.setenv("FASTCLR_PROBE_BACKEND", "sklearn")
    assert B.resolve_probe_backend(None) == "sklearn"


def test_unusable_choices_are_errors_not_silent_fallbacks(probes):
    probes(False, False)
    with pytest.raises(FastclrError, match="no CUDA device"):
        B.resolve_device("cuda")
    with pytest.raises(FastclrError, match="cuML"):
        B.resolve_knn_backend("cuml")
    with pytest.raises(FastclrError, match="cuML"):
        B.resolve_tsne_backend("cuml")
    with pytest.raises(FastclrError, match="unknown"):
        B.resolve_knn_backend("faiss")


def test_amp_on_cpu_without_native_bf16_stays_fp32(monkeypatch):
    monkeypatch.setattr(B, "cpu_has_native_bf16", lambda: False)
    dtype, note = B.resolve_amp_dtype(True, torch.device("cpu"))
    assert dtype is None and "fp32" in note
    monkeypatch.setattr(B, "cpu_has_native_bf16", lambda: True)
    assert B.resolve_amp_dtype(True, torch.device("cpu"))[0] == torch.bfloat16
    assert B.resolve_amp_dtype(False, torch.device("cpu"))[0] is None


def test_runtime_autocast_is_noop_without_amp(probes):
    probes(False, False)
    rt = B.make_runtime("cpu", amp=False)
    with rt.autocast():
        y = torch.nn.Linear(3, 3)(torch.randn(2, 3))
    assert y.dtype == torch.float32 and not rt.needs_grad_scaler
    assert rt.describe()["device"] == "cpu"


def test_deterministic_switch():
    try:
        B.make_runtime("cpu", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        B.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_optimizer_is_fused_adamw_where_available_and_matches_the_plain_one():
    """The fused AdamW must take the same steps as the per-tensor one (fp32; tolerance for its different
    operation order: rtol 1e-5, atol 1e-7)."""
    rt = B.make_runtime("cpu")
    # torch >= 2.4 has a fused CPU AdamW; the Runtime must ask for it, and the optimiser must be the fused one
    assert rt.fused_optimizer and B.fused_adamw_available("cpu")
    torch.manual_seed(0)
    w0 = torch.randn(7, 5)
    params = [w0.clone().requires_grad_(), w0.clone().requires_grad_()]
    fused = rt.optimizer([params[0]], lr=1e-2, weight_decay=1e-4)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([params[1]], lr=1e-2, weight_decay=1e-4)
    for _ in range(5):
        g = torch.randn(7, 5)
        for p, opt in zip(params, (fused, plain)):
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-7)
    assert not torch.equal(params[0], w0)


def test_malloc_tuning_can_be_switched_off(monkeypatch):
    B.keep_cpu_memory_mapped.cache_clear()
    monkeypatch.setenv("FASTCLR_MALLOC_TUNING", "0")
    try:
        assert B.keep_cpu_memory_mapped() is False
    finally:
        B.keep_cpu_memory_mapped.cache_clear()
    monkeypatch.delenv("FASTCLR_MALLOC_TUNING")
    import platform
    # on glibc both mallopt() calls succeed and the tuning is on; elsewhere it is off, never an error
    assert B.keep_cpu_memory_mapped() is (platform.libc_ver()[0] == "glibc")
