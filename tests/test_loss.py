"""NT-Xent: every implementation against a float64 loop written from the SimCLR paper's pseudocode."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastclr import triton_ntxent
from fastclr.loss import NTXentLoss, ntxent_compiled, ntxent_reference, resolve_impl

IMPLS = ["reference", "compiled", "tiled"]
# fp32 CPU cases that the Triton kernels join under the interpreter (it runs no float64 or bf16; those, and
# the GPU cases, are in tests/test_triton_ntxent.py)
FP32_IMPLS = IMPLS + (["triton"] if triton_ntxent.available() and triton_ntxent.interpreting() else [])
# bf16 keeps 8 mantissa bits (~3 significant digits) in the *inputs*; the loss itself runs in fp32.
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
FP16_TOL = dict(rtol=5e-3, atol=5e-3)


def ntxent_loop(z1, z2, t):
    """SimCLR Algorithm 1, literally: l(i, j) = -log(exp(s_ij/t) / sum_{k != i} exp(s_ik/t)), float64."""
    z = [F.normalize(v.double(), dim=0) for v in torch.cat([z1, z2])]
    n, m = len(z1), 2 * len(z1)

    def sim(a, b):
        return float(a @ b)

    def ell(i, j):
        den = sum(math.exp(sim(z[i], z[k]) / t) for k in range(m) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / t) / den)

    return sum(ell(k, k + n) + ell(k + n, k) for k in range(n)) / m


def run_impl(impl, z1, z2, t, tile=None):
    kw = {"tile_size": tile} if tile else {}
    return NTXentLoss(t, impl=impl, **kw)(z1, z2)


def loss_and_grads(impl, z1, z2, t, tile=None):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    loss = run_impl(impl, a, b, t, tile)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.5), (3, 8, 0.1), (8, 4, 1.0), (17, 16, 0.05)])
def test_reference_matches_paper_loop(n, d, t):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    assert ntxent_reference(z1, z2, t).item() == pytest.approx(ntxent_loop(z1, z2, t), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("impl", FP32_IMPLS)
@pytest.mark.parametrize("n", [2, 5, 64])
def test_identical_embeddings_give_log_2n_minus_1(impl, n):
    z = torch.ones(n, 16)
    expected = -math.log(1 / (2 * n - 1))
    assert run_impl(impl, z, z.clone(), 0.5).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("impl", FP32_IMPLS)
def test_symmetric_in_views(impl):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(33, 12, generator=g), torch.randn(33, 12, generator=g)
    torch.testing.assert_close(run_impl(impl, z1, z2, 0.3), run_impl(impl, z2, z1, 0.3))


@pytest.mark.parametrize("n,t", [(2, 0.5), (64, 0.1), (257, 0.05)])
def test_matches_pytorch_metric_learning(n, t):
    """Peer cross-check, run in CI (pytorch-metric-learning is in the dev extra): its NTXentLoss with each
    pair sharing a label is SimCLR's loss; values and gradients."""
    from pytorch_metric_learning.losses import NTXentLoss as PMLNTXent

    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    labels = torch.arange(n).repeat(2)
    ref = loss_and_grads("reference", z1, z2, t)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    peer = PMLNTXent(temperature=t)(torch.cat([a, b]), labels)
    peer.backward()
    for r, p in zip(ref, (peer.detach(), a.grad, b.grad)):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,t", [(2, 0.5), (64, 0.1), (257, 0.5)])
def test_matches_lightly_when_installed(n, t):
    """Peer cross-check: lightly's NTXentLoss (optional, not a dependency) computes the same NT-Xent."""
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
    torch.testing.assert_close(ntxent_reference(z1, z2, t), lightly_loss.NTXentLoss(temperature=t)(z1, z2))


# sizes include odd N and sizes that are not a multiple of the tile
GRID = [(2, 4, 0.5, 1), (3, 7, 0.1, 2), (10, 16, 0.07, 3), (33, 32, 0.5, 8), (64, 128, 0.2, 50), (100, 8, 1.0, 1024)]


@pytest.mark.parametrize("impl", FP32_IMPLS[1:])
@pytest.mark.parametrize("n,d,t,tile", GRID)
def test_fast_impls_match_reference_fp32(impl, n, d, t, tile):
    if impl == "triton" and n * d > 4096:
        pytest.skip("12 s in Triton's interpreter; tests/test_triton_ntxent.py covers its paths at small sizes")
    g = torch.Generator().manual_seed(n + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ref = loss_and_grads("reference", z1, z2, t)
    got = loss_and_grads(impl, z1, z2, t, tile)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r)  # default fp32 tolerances: rtol 1.3e-6, atol 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,t,tile", GRID[:4])
def test_all_impls_match_paper_loop_fp64(impl, n, d, t, tile):
    g = torch.Generator().manual_seed(7 * n + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    loss, ga, gb = loss_and_grads(impl, z1, z2, t, tile)
    assert loss.item() == pytest.approx(ntxent_loop(z1, z2, t), rel=1e-10)
    # gradients in float64 against finite differences of the loop formula's autograd twin
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: run_impl(impl, x, y, t, tile), (a, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
@pytest.mark.parametrize("t", [0.5, 0.05])
def test_half_precision_inputs_finite_and_close(impl, dtype, tol, t):
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g)
    ref = loss_and_grads("reference", z1, z2, t)
    half = loss_and_grads(impl, z1.to(dtype), z2.to(dtype), t, 16)
    assert torch.isfinite(half[0]) and all(torch.isfinite(x).all() for x in half[1:])
    assert half[1].dtype == dtype  # gradient comes back in the input's dtype
    torch.testing.assert_close(half[0], ref[0], **tol)
    # gradients are ~1/(N t) in size: compare relative to their scale
    for r, h in zip(ref[1:], half[1:]):
        torch.testing.assert_close(h.float() / r.abs().max(), r / r.abs().max(), **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_under_autocast_cpu_bf16(impl):
    layer = torch.nn.Linear(16, 32)
    x1, x2 = torch.randn(20, 16), torch.randn(20, 16)
    ref = NTXentLoss(0.1)(layer(x1), layer(x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = layer(x1), layer(x2)
        assert z1.dtype == torch.bfloat16
        loss = NTXentLoss(0.1, impl=impl)(z1, z2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(loss, ref.detach(), **BF16_TOL)


@pytest.mark.parametrize("impl", FP32_IMPLS + ["auto"])
def test_bad_input_raises_value_error(impl):
    fn = NTXentLoss(0.5, impl=impl)
    with pytest.raises(ValueError, match="same shape"):
        fn(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(4, 3, 1), torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(bad, torch.randn(4, 3))
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            NTXentLoss(t, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        NTXentLoss(0.5, impl="fast")


def test_auto_on_the_cpu_is_a_fixed_rule():
    """CPU runs stay bit-reproducible: auto picks by size, never by a timing."""
    assert resolve_impl(torch.zeros(1023, 8), 0.5) == "reference"
    assert resolve_impl(torch.zeros(1024, 8), 0.5) == "tiled"
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    assert NTXentLoss(0.5, impl="auto")(z1, z2).item() == NTXentLoss(0.5)(z1, z2).item()


def test_compiled_does_not_recompile_for_new_batch_size_or_temperature():
    from torch._dynamo.utils import counters

    from fastclr.backend import compile_available

    if not compile_available():
        pytest.skip("torch.compile is not usable here: the compiled loss runs eagerly")
    z = lambda n: (torch.randn(n, 8, requires_grad=True), torch.randn(n, 8))
    ntxent_compiled(*z(5), 0.5).backward()          # warm: compiles the dynamic graphs
    ntxent_compiled(*z(6), 0.5).backward()
    before = dict(counters["stats"])
    assert before.get("unique_graphs", 0) >= 2           # the forward and the backward were compiled
    for n, t in [(7, 0.5), (40, 0.1), (129, 2.0)]:
        ntxent_compiled(*z(n), t).backward()
    assert dict(counters["stats"]).get("unique_graphs") == before["unique_graphs"]


@pytest.mark.slow
def test_tiled_memory_stays_bounded_at_large_n():
    """N=8192 (a 16384 x 16384 problem; the dense fp32 matrix alone is 1 GiB, the reference holds several)."""
    # VmHWM, the peak of this process's own address space (ru_maxrss would carry over pytest's peak)
    code = textwrap.dedent("""
        import torch
        from fastclr.loss import ntxent_tiled
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
        torch.manual_seed(0)
        z1 = torch.randn(8192, 128, requires_grad=True); z2 = torch.randn(8192, 128, requires_grad=True)
        base = hwm()
        loss = ntxent_tiled(z1, z2, 0.5, tile=1024); loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
        print(hwm() - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert 0 < extra_mib < 256, f"tiled loss grew the process by {extra_mib:.0f} MiB (dense would be >= 1024 MiB)"


# --------------------------------------------------------------------------- distributed (2 gloo processes)

def _dist_worker(rank, world, init_file, impl, x, w, result_q):
    import torch.distributed as dist

    from datetime import timedelta

    # a bounded wait: a rank stuck in rendezvous or a collective raises (and fails the test) instead of hanging
    # the suite (seen once under torch 2.5.1, docs/versions.md)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    layer = torch.nn.Linear(x.shape[1], 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    n = x.shape[0] // 2 // world                      # x is [view1; view2] of the global batch
    half = x.shape[0] // 2
    x1, x2 = x[rank * n:(rank + 1) * n], x[half + rank * n: half + (rank + 1) * n]
    loss = NTXentLoss(0.3, impl=impl, gather_distributed=True, tile_size=3)(layer(x1), layer(x2))
    loss.backward()
    grad = layer.weight.grad.clone()
    dist.all_reduce(grad)                              # what DistributedDataParallel does: average over ranks
    grad /= world
    result_q.put((rank, loss.item(), grad.tolist()))   # plain data: the worker exits before the parent reads
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("impl", FP32_IMPLS)
def test_distributed_two_ranks_equal_single_process(impl, tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2 * 10, 6, generator=g), torch.randn(8, 6, generator=g)
    layer = torch.nn.Linear(6, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    single = NTXentLoss(0.3, impl=impl)(layer(x[:10]), layer(x[10:]))
    single.backward()

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), impl, x, w, q), nprocs=2, join=True)
    results = [q.get() for _ in range(2)]
    for rank, loss, grad in results:
        assert loss == pytest.approx(single.item(), rel=1e-5), f"rank {rank}"
        torch.testing.assert_close(torch.tensor(grad), layer.weight.grad)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_loss_compiles_as_one_graph_with_the_eager_value_and_gradient(impl):
    """torch.compile(fullgraph=True) of the training loss (check_finite=False, as fastclr.train builds it: the
    finiteness check is a host sync) fails on any graph break or sync; values and gradients equal eager's to
    fp32 rounding (rtol 1e-5)."""
    loss = NTXentLoss(0.2, impl, check_finite=False)
    compiled = torch.compile(loss, fullgraph=True)
    z1, z2 = torch.randn(32, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    ours = compiled(z1, z2)
    g_ours = torch.autograd.grad(ours, (z1, z2))
    ref = loss(z1, z2)
    g_ref = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
