"""fastclr.triton_ntxent: the fused Triton NT-Xent against the float64 reference, values and gradients.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py switches it on): fp32
with exact ("ieee") dots, within 1e-5 relative of float64. The gpu-marked cases run compiled kernels at real
sizes: TF32 dots within 1e-3 relative, bf16 within 2e-2.
"""
import pytest
import torch

from fastclr import triton_ntxent
from fastclr.loss import NTXentLoss, ntxent_reference, ntxent_triton

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not triton_ntxent.available() or not (ON_GPU or triton_ntxent.interpreting()),
                                reason="needs Triton >= 3.6, and a GPU or TRITON_INTERPRET=1")
CPU_TOL = 1e-5          # interpreter, fp32 with exact dots, against float64

# (N pairs, D, t): N=2 (the smallest), M=2N not a multiple of the 16-row block, D not a power of two,
# D past one 16-wide chunk (the interpreter's chunked path), M an exact multiple of the block, t = 0.05
CASES = [(2, 3, 0.5), (13, 12, 0.2), (9, 20, 0.05), (40, 16, 0.1), (7, 40, 0.5), (24, 5, 0.05)]


def inputs(n, d, seed, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2)]


def loss_and_grads(fn, z1, z2, t):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = fn(a, b, t)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def assert_close_rel(got, ref, rtol):
    """Within ``rtol`` of the reference, relative to the reference's largest entry (gradients are ~1/(N t))."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


@pytest.mark.skipif(ON_GPU, reason="the interpreter cases; the GPU runs test_gpu_*")
@pytest.mark.parametrize("n,d,t", CASES)
def test_values_and_gradients_match_float64(n, d, t):
    z1, z2 = inputs(n, d, seed=n * 31 + d)
    ref = loss_and_grads(ntxent_reference, z1, z2, t)
    got = loss_and_grads(ntxent_triton, z1.float(), z2.float(), t)
    for r, g in zip(ref, got):
        assert_close_rel(g, r, CPU_TOL)


def masked_lse(z, t):
    """The float64 truth for row_lse: logsumexp over j != i of z_i . z_j / t."""
    s = (z @ z.T) / t
    return torch.logsumexp(s.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf")), 1)


@pytest.mark.skipif(ON_GPU, reason="the interpreter cases")
@pytest.mark.parametrize("m,d,t", [(4, 3, 0.5), (37, 20, 0.1), (50, 16, 0.05)])
def test_row_lse_backward_with_any_upstream_gradient(m, d, t):
    """NT-Xent's own upstream gradient is uniform (1/M per row); a random one checks both terms of
    g_i P_ij + g_j P_ji, which a uniform g cannot tell apart."""
    g = torch.Generator().manual_seed(m)
    z = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    up = torch.randn(m, generator=g, dtype=torch.float64)
    a, b = z.clone().requires_grad_(), z.float().requires_grad_()
    ref, got = masked_lse(a, t), triton_ntxent.row_lse(b, t)
    (ref * up).sum().backward()
    (got * up.float()).sum().backward()
    assert_close_rel(got, ref, CPU_TOL)
    assert_close_rel(b.grad, a.grad, CPU_TOL)


def test_the_loss_module_runs_it_and_gathers_nothing_extra():
    z1, z2 = inputs(5, 8, seed=1, device=DEV, dtype=torch.float32)
    got = NTXentLoss(0.2, impl="triton")(z1, z2)
    assert_close_rel(got, ntxent_reference(z1.double(), z2.double(), 0.2), 1e-3 if ON_GPU else CPU_TOL)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(triton_ntxent, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1.*impl='tiled'"):
        NTXentLoss(0.5, impl="triton")(torch.randn(4, 8), torch.randn(4, 8))


def test_unsupported_input_is_refused_clearly():
    with pytest.raises(ValueError, match="float64"):
        ntxent_triton(torch.randn(4, 8, dtype=torch.float64, device=DEV),
                      torch.randn(4, 8, dtype=torch.float64, device=DEV), 0.5)
    d = triton_ntxent.MAX_DIM + 1
    with pytest.raises(ValueError, match=f"up to {triton_ntxent.MAX_DIM}, got D={d}"):
        ntxent_triton(torch.randn(2, d, device=DEV), torch.randn(2, d, device=DEV), 0.5)


# --------------------------------------------------------------------------- GPU (compiled kernels, real sizes)

@pytest.mark.gpu
@pytest.mark.parametrize("n,d", [(2, 128), (1000, 128), (4096, 128), (2048, 1024), (777, 50)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_gpu_values_and_gradients_match_float64(n, d, dtype, rtol):
    z1, z2 = inputs(n, d, seed=n + d)
    ref = loss_and_grads(ntxent_reference, z1.cuda(), z2.cuda(), 0.1)
    got = loss_and_grads(ntxent_triton, z1.to("cuda", dtype), z2.to("cuda", dtype), 0.1)
    assert got[1].dtype == dtype
    for r, g in zip(ref, got):
        assert_close_rel(g, r, rtol)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_n():
    """N=16,384 pairs (M=32,768): the dense matrix would be 4 GiB; the kernels keep O(N D)."""
    z1, z2 = (torch.randn(16384, 128, device="cuda", requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ntxent_triton(z1, z2, 0.1).backward()
    torch.cuda.synchronize()
    extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert extra_mib < 128, f"{extra_mib:.0f} MiB"


@pytest.mark.skipif(ON_GPU, reason="the interpreter cases")
def test_fp16_dots_keep_tiny_gradients():
    """fp16 dots, with the backward's weights g P (~1/M^2 at large M) and dL/dz kept in fp32: an upstream
    gradient of 1e-9 per row still gives the float64 gradient to fp16's precision, not zero."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(20, 16, generator=g, dtype=torch.float64), dim=1)
    up = torch.full((20,), 1e-9, dtype=torch.float64)
    a, b = z.clone().requires_grad_(), z.float().requires_grad_()
    (masked_lse(a, 0.5) * up).sum().backward()
    (triton_ntxent.row_lse(b, 0.5, torch.float16) * up.float()).sum().backward()
    assert_close_rel(b.grad, a.grad, 2e-2)


# --------------------------------------------------------------------------- the GPU build, checked on any machine

@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The configurations launch_config picks for an H200 (N=16,384 pairs; fp32, bf16, fp16 at D=128, fp32
    at D=1,024) build to sm_90 with tensor-core (wgmma) dots and no register spills: what can be checked of
    the GPU build without a GPU. In a subprocess, because the kernels here are the interpreter's."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-m", "fastclr.triton_ntxent", "--json"], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode == 3:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert len(rows) == 8                                       # 4 configurations x (forward, backward)
    for row in rows:
        assert row["wgmma"], row
        assert row["spill_bytes"] == 0, row


@pytest.mark.gpu
@pytest.mark.parametrize("n", [256, 8192])
def test_gpu_auto_picks_a_measured_impl_that_agrees(n):
    from fastclr.loss import resolve_impl

    z1, z2 = inputs(n, 128, seed=n, device="cuda", dtype=torch.float32)
    with torch.no_grad():       # auto's one-time measurement runs its own backward passes
        assert resolve_impl(z1, 0.2) in ("triton", "reference", "tiled")
    got = NTXentLoss(0.2, impl="auto")(z1, z2)
    assert_close_rel(got, ntxent_reference(z1.double(), z2.double(), 0.2), 1e-3)


def test_an_old_triton_is_refused_with_the_version_it_needs(monkeypatch):
    monkeypatch.setattr(triton_ntxent, "_version", lambda: (3, 1))
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.6 \(found .*impl='tiled'"):
        NTXentLoss(0.5, impl="triton")(torch.randn(4, 8, device=DEV), torch.randn(4, 8, device=DEV))
