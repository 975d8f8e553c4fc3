"""fastclr.kernels against the PyTorch layers they replace: values and gradients, ties, bf16, fallbacks."""
import copy
import os
import shutil
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastclr import kernels
from fastclr.backend import make_runtime, resolve_cpu_kernels
from fastclr.model import Encoder

from conftest import needs_kernels  # noqa: E402  (the kernel_calls fixture is there too)


def _with_ties(shape, dtype, seed=0):
    """Random values with exact ties: a constant block, and a block where every value repeats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, :, : shape[2] // 2, : shape[3] // 2] = 0.25
    x[:, :, shape[2] // 2:, :] = x[:, :, shape[2] // 2:, :].round()
    return x.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 4, 4), (3, 32, 14, 14), (5, 64, 28, 6)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pool_relu_equals_aten_exactly(shape, dtype, channels_last):
    """Same values and the same gradient bit for bit, ties included (the first maximum in raster order)."""
    x = _with_ties(shape, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.relu(F.max_pool2d(xr, 2))
    out = kernels.pool_relu(xk)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.equal(out, ref)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(xk.grad, xr.grad)


def _block_reference(x, conv, mean, std):
    """The tutorial's first block in float64 (the truth both implementations are held to)."""
    c = copy.deepcopy(conv).double()
    return F.relu(F.max_pool2d(c((x.double() - mean) / std), 2))


@needs_kernels
@pytest.mark.parametrize("n,c,h,w", [(1, 16, 28, 28), (5, 32, 8, 12), (3, 64, 28, 28)])
def test_conv3x3_pool_relu_matches_float64(n, c, h, w):
    """fp32 kernel vs float64 PyTorch: values to 1e-5, weight and bias gradients to 1e-4 (relative)."""
    torch.manual_seed(0)
    x = torch.rand(n, 1, h, w)
    x[:, :, : h // 3] = 0                                       # background: exact ties in the pool
    conv = torch.nn.Conv2d(1, c, 3, padding=1)
    conv64 = copy.deepcopy(conv).double()
    assert kernels.conv3x3_pool_relu_supported(x, conv)
    out = kernels.conv3x3_pool_relu(x, conv, 0.1307, 0.3081)
    ref = F.relu(F.max_pool2d(conv64((x.double() - 0.1307) / 0.3081), 2))
    assert out.dtype == torch.float32 and out.shape == ref.shape == (n, c, h // 2, w // 2)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g.float())
    ref.backward(g)
    for p, p64 in ((conv.weight, conv64.weight), (conv.bias, conv64.bias)):
        err = (p.grad.double() - p64.grad).norm() / p64.grad.norm()
        assert err < 1e-4, err


@needs_kernels
def test_conv3x3_pool_relu_bf16_autocast_is_at_least_as_accurate_as_aten():
    """Under bf16 autocast the output is bf16 like ATen's; measured against float64, the kernel's error is
    within bf16 rounding and no larger than ATen's (which rounds inputs and weights to bf16 first)."""
    torch.manual_seed(1)
    x = torch.rand(8, 1, 28, 28)
    conv = torch.nn.Conv2d(1, 16, 3, padding=1)
    ref = _block_reference(x, conv, 0.1307, 0.3081)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.conv3x3_pool_relu(x, conv, 0.1307, 0.3081)
        aten = F.relu(F.max_pool2d(conv((x - 0.1307) / 0.3081), 2))
    assert out.dtype == aten.dtype == torch.bfloat16
    err_k = (out.double() - ref).abs().max().item()
    err_a = (aten.double() - ref).abs().max().item()
    assert err_k <= ref.abs().max().item() * 2 ** -8 + 1e-6
    assert err_k <= err_a


@needs_kernels
@pytest.mark.parametrize("arch,width", [("tutorial", 16), ("cnn", 16), ("cnn", 32)])
def test_encoder_with_kernels_equals_layers(arch, width, kernel_calls, monkeypatch):
    """The whole encoder, kernels on vs off (fp32, train mode): outputs and every parameter's gradient. The convs
    stay ATen's (Winograd's, less exact by design, are held against float64 in
    test_cnn_encoder_in_f32_takes_the_convs_where_they_pay)."""
    monkeypatch.setattr(kernels, "WINOGRAD_LANES", ())
    torch.manual_seed(0)
    enc = Encoder(arch, width=width).to(memory_format=torch.channels_last)
    x = torch.rand(6, 1, 28, 28)
    x[:, :, :5] = 0
    outs, grads = [], []
    for on in (False, True):
        enc.zero_grad()
        enc.cpu_kernels = on
        h = enc(x)
        (h * torch.linspace(-1, 1, h.shape[1])).sum().backward()
        outs.append(h.detach())
        grads.append({k: p.grad.clone() for k, p in enc.named_parameters()})
        if not on:
            assert not kernel_calls
    # the tutorial net's first conv has a bias: its first block is one kernel; the cnn's BN -> pool -> ReLU twice
    # and BN -> ReLU once are the fused BN kernel in training
    assert kernel_calls.get("pool_relu") == (1 if arch == "tutorial" else None)
    assert kernel_calls.get("conv3x3_pool_relu") == (1 if arch == "tutorial" else None)
    assert kernel_calls.get("bn_act") == (None if arch == "tutorial" else 3)
    # the fused BN sums its statistics in double, ATen in f32: through four BN layers on a batch of 6, about 2e-5
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=5e-5)
    for k in grads[0]:
        # the first conv's weight gradient sums x * dy where dy (after BN's backward) has mean ~0: it cancels, so
        # its small entries carry float noise of the gradient's scale (both paths are within 1e-5 of float64 there)
        atol = 1e-5 * max(1.0, grads[0][k].abs().max().item())
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=atol, msg=k)


@needs_kernels
def test_unsupported_inputs_fall_back_to_layers(kernel_calls):
    """Channel counts the kernels do not take, an input that needs a gradient, fp16 autocast: the layers run."""
    conv = torch.nn.Conv2d(1, 16, 3, padding=1)
    x = torch.rand(2, 1, 28, 28)
    assert not kernels.pool_relu_supported(torch.rand(2, 8, 4, 4))
    assert not kernels.pool_relu_supported(torch.rand(2, 16, 5, 4))
    assert not kernels.conv3x3_pool_relu_supported(x.clone().requires_grad_(), conv)
    assert not kernels.conv3x3_pool_relu_supported(x, torch.nn.Conv2d(1, 8, 3, padding=1))
    assert not kernels.conv3x3_pool_relu_supported(x, torch.nn.Conv2d(1, 16, 3, padding=1, bias=False))
    with torch.autocast("cpu", dtype=torch.float16):
        assert not kernels.conv3x3_pool_relu_supported(x, conv)
    enc = Encoder("tutorial")
    xg = x.clone().requires_grad_()
    ref = enc(xg)
    enc.cpu_kernels = True
    torch.testing.assert_close(enc(xg), ref, rtol=1e-5, atol=1e-5)
    assert "conv3x3_pool_relu" not in kernel_calls        # an input that needs a gradient: the layers ran


# --------------------------------------------------------------------------- training BatchNorm + pool + ReLU

def _bn_reference(x, bn, mode):
    z = bn(x)
    if mode == kernels.BN_RELU:
        return F.relu(z)
    if mode == kernels.BN_MAXPOOL_RELU:
        return F.relu(F.max_pool2d(z, 2))
    return F.avg_pool2d(F.relu(z), 2)


def _bn_pair(c, seed=0):
    """Two equal training-mode BatchNorm2d, with a weight of both signs (a negative scale reverses the max)."""
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn, copy.deepcopy(bn)


# f32: the kernel sums in double where ATen sums in f32, so they differ by float rounding. bf16: both round z
# to bf16 before the pool, so they differ where the statistics' last bit moves a value across a rounding
# boundary: one bf16 step (2^-8 relative) on a few elements.
_BN_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [kernels.BN_RELU, kernels.BN_MAXPOOL_RELU, kernels.BN_RELU_AVGPOOL])
@pytest.mark.parametrize("shape", [(4, 16, 6, 8), (8, 32, 16, 16), (3, 48, 4, 2)])
def test_bn_act_equals_aten(shape, mode, dtype):
    """Output, input gradient, weight and bias gradients and running statistics against BatchNorm2d and the
    pool / ReLU ATen layers, on an input whose mean is far from 0."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 3).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    bn_ref, bn = _bn_pair(shape[1])
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = _bn_reference(xr, bn_ref, mode), kernels.bn_act(xk, bn, mode)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    ref.backward(g)
    out.backward(g)
    tol = _BN_TOL[dtype]
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(xk.grad, xr.grad, **tol)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(bn, name).grad, getattr(bn_ref, name).grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(bn_ref, name), rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


@needs_kernels
def test_bn_act_routes_ties_to_the_first_maximum():
    """Equal values in a window: the gradient goes to the first in raster order, as max_pool2d sends it."""
    x = _with_ties((3, 16, 8, 8), torch.float32).contiguous(memory_format=torch.channels_last)
    bn_ref, bn = _bn_pair(16)
    xr, xk = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = _bn_reference(xr, bn_ref, kernels.BN_MAXPOOL_RELU), kernels.bn_act(xk, bn, kernels.BN_MAXPOOL_RELU)
    (ref * torch.arange(ref.numel()).view_as(ref)).sum().backward()
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-4, atol=1e-3)


@needs_kernels
def test_bn_act_takes_only_what_it_fuses():
    bn = torch.nn.BatchNorm2d(16)
    x = torch.randn(2, 16, 4, 4)
    assert kernels.bn_act_supported(x, bn, kernels.BN_MAXPOOL_RELU)
    assert not kernels.bn_act_supported(torch.randn(2, 24, 4, 4), torch.nn.BatchNorm2d(24), kernels.BN_RELU)
    assert not kernels.bn_act_supported(torch.randn(2, 16, 5, 4), bn, kernels.BN_MAXPOOL_RELU)
    assert kernels.bn_act_supported(torch.randn(2, 16, 5, 5), bn, kernels.BN_RELU)       # no pool: any size
    assert not kernels.bn_act_supported(x.half(), bn, kernels.BN_RELU)
    assert not kernels.bn_act_supported(x, bn.eval(), kernels.BN_RELU)                    # running statistics
    assert not kernels.bn_act_supported(x, torch.nn.BatchNorm2d(16, momentum=None), kernels.BN_RELU)
    assert not kernels.bn_act_supported(x, torch.nn.BatchNorm2d(16, affine=False), kernels.BN_RELU)
    assert not kernels.bn_act_supported(torch.randn(1, 16, 1, 1), bn.train(), kernels.BN_RELU)  # one value each


# --------------------------------------------------------------------------- the cnn's first stage, whole

def _stem_layers(cin, cout, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    bn, _ = _bn_pair(cout, seed)
    return conv, bn


def _stem_run(x, conv, bn, g, fused, dtype=torch.float64):
    """conv -> bn -> max-pool -> ReLU by the stem kernel (fused), by ATen's layers under bf16 autocast, or by the
    layers in float64 on the bf16-rounded weight autocast convolves with; the output and the three gradients."""
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    if fused:
        out = kernels.stem(x, conv, bn)
    elif dtype == torch.bfloat16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = F.relu(F.max_pool2d(bn(conv(x)), 2))
    else:
        conv, bn = conv.double(), bn.double()
        with torch.no_grad():
            conv.weight.copy_(conv.weight.to(torch.bfloat16).double())
        out = F.relu(F.max_pool2d(bn(conv(x.double())), 2))
    (out.double() * g.double()).sum().backward()
    return out.double(), conv.weight.grad.double(), bn.weight.grad.double(), bn.bias.grad.double(), bn


@needs_kernels
@pytest.mark.parametrize("n,cin,h,w,cout", [(4, 3, 8, 8, 32), (2, 1, 28, 28, 16), (3, 2, 6, 10, 64),
                                            (8, 3, 32, 32, 32), (2, 4, 12, 64, 16)])
def test_stem_equals_aten(n, cin, h, w, cout):
    """The stem kernel (bf16 in and out, as under autocast) against ATen's conv, BatchNorm2d, max-pool and ReLU
    under bf16 autocast, both against float64 (on the same bf16 input and weight), on an input with ties (a
    constant block: equal conv outputs inside windows) and a mean far from 0: output and the conv weight, BN
    weight and bias gradients within 1.5x of ATen's error (or 1e-3 of the value's scale), the output equal to
    ATen's to a bf16 step; the running statistics, which the kernel takes from the unrounded conv output (ATen from
    its bf16 rounding), within a tenth of ATen's error from float64 or f32 rounding."""
    x = (_with_ties((n, cin, h, w), torch.float32) + 1.5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    conv, bn = _stem_layers(cin, cout)
    assert kernels.stem_supported(x, conv, bn)
    g = torch.randn(n, cout, h // 2, w // 2, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    fused = _stem_run(x, conv, bn, g, True)
    aten = _stem_run(x, conv, bn, g, False, torch.bfloat16)
    exact = _stem_run(x, conv, bn, g, False)
    assert fused[0].shape == (n, cout, h // 2, w // 2)
    torch.testing.assert_close(fused[0], aten[0], **_BN_TOL[torch.bfloat16])
    for name, f, a, t in zip(("output", "conv weight grad", "BN weight grad", "BN bias grad"), fused, aten, exact):
        err_fused, err_aten = (f - t).abs().max(), (a - t).abs().max()
        assert err_fused <= max(1.5 * err_aten, 1e-3 * t.abs().max()), (name, err_fused, err_aten)
    for name in ("running_mean", "running_var"):        # of the unrounded conv output, from the patches' moments
        f, a, t = (getattr(r[4], name).double() for r in (fused, aten, exact))
        err_fused, err_aten = (f - t).abs().max(), (a - t).abs().max()
        assert err_fused <= max(0.1 * err_aten, 1e-6 * t.abs().max()), (name, err_fused, err_aten)
    assert fused[4].num_batches_tracked.item() == 1


@needs_kernels
@pytest.mark.parametrize("per_channel", [True, False])
def test_stem_normalises_raw_views_as_normalize_does(per_channel):
    """Given the raw f32 views and the statistics, the stem's output, gradients and BN statistics are exactly those
    it gives on kernels.normalize's bf16 output (the same rounding, one pass fewer)."""
    x = torch.rand(4, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1) if per_channel else torch.tensor(0.45)
    std = torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1) if per_channel else torch.tensor(0.22)
    conv, bn = _stem_layers(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.stem_supported(x, conv, bn, raw=True)
        xn = kernels.normalize(x, mean, std)
    g = torch.randn(4, 16, 4, 5)
    runs = []
    for raw in (True, False):
        c, b = copy.deepcopy(conv), copy.deepcopy(bn)
        out = kernels.stem(x, c, b, mean, std) if raw else kernels.stem(xn, c, b)
        (out.float() * g).sum().backward()
        runs.append([out, c.weight.grad, b.weight.grad, b.bias.grad, b.running_mean, b.running_var])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not kernels.stem_supported(x, conv, bn, raw=True)          # outside bf16 autocast: ATen's conv


@needs_kernels
def test_stem_takes_only_what_it_fuses():
    conv, bn = _stem_layers(3, 32)
    x = torch.rand(2, 3, 8, 8).to(torch.bfloat16)
    assert kernels.stem_supported(x, conv, bn)
    assert not kernels.stem_supported(x.float(), conv, bn)                           # f32: ATen's conv
    assert not kernels.stem_supported(x.requires_grad_(), conv, bn)                   # an input gradient
    x = x.detach()
    assert not kernels.stem_supported(x[:, :, :7], conv, bn)                         # odd height
    assert not kernels.stem_supported(torch.rand(2, 3, 8, 66).bfloat16(), conv, bn)  # wider than 64
    assert not kernels.stem_supported(x, torch.nn.Conv2d(3, 32, 3, padding=1), bn)   # a bias
    assert not kernels.stem_supported(x, torch.nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), bn)
    assert not kernels.stem_supported(x, torch.nn.Conv2d(3, 24, 3, padding=1, bias=False), torch.nn.BatchNorm2d(24))
    assert not kernels.stem_supported(torch.rand(2, 8, 8, 8).bfloat16(), torch.nn.Conv2d(8, 32, 3, padding=1,
                                                                                         bias=False), bn)
    assert not kernels.stem_supported(x, conv, bn.eval())                             # running statistics


# --------------------------------------------------------------------------- a 3x3 conv's weight gradient

@needs_kernels
@pytest.mark.parametrize("n,ci,co,h,w", [(4, 8, 16, 6, 6), (3, 32, 48, 10, 8), (2, 64, 128, 8, 8), (2, 4, 32, 5, 12),
                                         (1, 16, 64, 16, 16), (3, 64, 128, 7, 7), (2, 8, 16, 4, 1), (2, 12, 16, 1, 3),
                                         (5, 36, 64, 9, 9)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv3x3_equals_aten(n, ci, co, h, w, dtype):
    """conv3x3 (ATen's forward and input gradient, fastclr's weight gradient) against nn.Conv2d (under bf16 autocast
    for bf16) and in float64 on the same input and weight: the output and the input gradient equal to ATen's.
    bf16: the weight gradient within 1.5x of ATen's error from float64 (it sums in f32 and is not rounded to bf16,
    so it is closer: about 1e-6 of the gradient's scale against ATen's 2e-3). f32 (the encoders' convs on a CPU
    without native bf16; tiles of 6 input channels, then 2 or 4): within 1e-5 of the scale, where ATen's f32 sum is."""
    torch.manual_seed(0)
    bf16 = dtype == torch.bfloat16
    conv = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False)
    x = torch.randn(n, ci, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, co, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    assert kernels.conv3x3_supported(x, conv)
    grads = []
    for how in ("kernel", "aten", "float64"):
        c = copy.deepcopy(conv)
        xi = (x.double() if how == "float64" else x.clone()).requires_grad_()
        if how == "float64":
            c = c.double()
            with torch.no_grad():
                c.weight.copy_(conv.weight.to(dtype).double())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and how == "aten"):
            y = kernels.conv3x3(xi, c, winograd=False) if how == "kernel" else c(xi)
        y.backward(g.to(y.dtype))
        grads.append((y.double(), xi.grad.double(), c.weight.grad.double()))
    (yk, dxk, dwk), (ya, dxa, dwa), (_, _, dw64) = grads
    assert yk.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yk, ya, rtol=0, atol=0)
    torch.testing.assert_close(dxk, dxa, rtol=0, atol=0)
    scale = dw64.abs().max()
    err_kernel, err_aten = (dwk - dw64).abs().max(), (dwa - dw64).abs().max()
    limit = min(1.5 * err_aten, 1e-5 * scale) if bf16 else 1e-5 * scale
    assert err_kernel <= limit and (bf16 or err_aten <= limit), (err_kernel, err_aten)


@needs_kernels
@pytest.mark.parametrize("n,ci,co,h,w", [(4, 16, 16, 6, 6), (3, 32, 64, 16, 16), (2, 64, 128, 8, 8), (3, 64, 128, 7, 7),
                                         (1, 16, 48, 10, 14), (1, 48, 16, 9, 3), (2, 32, 16, 1, 1), (1, 16, 32, 25, 1),
                                         (1, 16, 16, 17, 3), (4, 128, 64, 5, 7)])
def test_conv3x3_winograd_against_float64(n, ci, co, h, w):
    """conv3x3 by Winograd (f32: forward, input gradient and weight gradient all fastclr's) against the same conv in
    float64, where ATen's f32 conv is within 1e-5 of each value's scale: the weight gradient (F(2x2, 3x3), whose
    transforms hold only +-1 and halves) within that too; the output and input gradient (F(4x4, 3x3), whose
    constants up to 8 and 1/24 amplify f32 rounding, measured at 2e-6 to 1e-5 of the scale at these shapes) within
    5e-5, still 20x inside the 1e-3 that bf16 autocast trains with. The shapes cover odd sides (the last tile
    partly outside the image), one-pixel images, blocks that end inside an image (the conv's 12 tiles, the weight
    gradient's 30, at 16 x 16), the conv's last block with every remainder after groups of 6 tiles (1 to 5: 7, 8,
    3, 16 and 5 tiles of 4 x 4), and the weight gradient's input channels in tails of 4 (16, 64), 2 (32, 128) and
    none (48) after groups of 6."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(ci, co, 3, padding=1, bias=False)
    x = torch.randn(n, ci, h, w).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, co, h, w).contiguous(memory_format=torch.channels_last)
    assert kernels.conv3x3_supported(x, conv)
    results = []
    for how in ("winograd", "aten", "float64"):
        c = copy.deepcopy(conv).double() if how == "float64" else copy.deepcopy(conv)
        xi = (x.double() if how == "float64" else x.clone()).requires_grad_()
        y = kernels.conv3x3(xi, c, winograd=True) if how == "winograd" else c(xi)
        y.backward(g.to(y.dtype))
        results.append((y.double(), xi.grad.double(), c.weight.grad.double()))
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    for name, floor, wino, aten, truth in zip(("output", "input gradient", "weight gradient"), (5e-5, 5e-5, 1e-5),
                                              *results):
        scale = truth.abs().max()
        err_wino, err_aten = (wino - truth).abs().max(), (aten - truth).abs().max()
        assert err_wino <= floor * scale and err_aten <= 1e-5 * scale, (name, err_wino, err_aten)


@needs_kernels
@pytest.mark.parametrize("co,ci", [(16, 16), (32, 48), (128, 64)])
def test_winograd_weight_is_g_w_gt(co, ci):
    """The packed F(4x4, 3x3) weight transform against U = G w G^T written out in float64 with Lavin and Gray's G:
    equal to f32 rounding (the C side sums in double and rounds once)."""
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                      [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    w = torch.randn(co, ci, 3, 3)
    ref = torch.einsum("ay,oiyx,bx->oiab", g, w.double(), g)                          # (Co, Ci, 6, 6)
    u = kernels.winograd_weight(w)                                                     # (Co / 16, 36, Ci, 16)
    got = u.view(co // 16, 6, 6, ci, 16).permute(0, 4, 3, 1, 2).reshape(co, ci, 6, 6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7 * ref.abs().max().item())


@needs_kernels
def test_winograd_takes_only_what_it_computes():
    """Winograd runs on f32 outside autocast, on the CPUs where it was measured faster, with Ci and Co multiples of
    16 (the input gradient's output channels are the conv's input channels)."""
    conv = torch.nn.Conv2d(32, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 32, 8, 8)
    assert kernels.winograd_supported(x, conv) == (kernels.native_lanes() in kernels.WINOGRAD_LANES)
    assert not kernels.winograd_supported(x.bfloat16(), conv)
    assert not kernels.winograd_supported(x[:, :8], torch.nn.Conv2d(8, 64, 3, padding=1, bias=False))
    assert not kernels.winograd_supported(x, torch.nn.Conv2d(32, 40, 3, padding=1, bias=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.winograd_supported(x, conv)       # ATen's conv would compute in bf16 here


def _layers_kernels_float64(ref: Encoder, x: torch.Tensor, autocast: bool):
    """``ref`` (the layers), a copy with the kernels on and a float64 copy, each run forward and backward on ``x``
    (the first two under bf16 autocast if ``autocast``): (enc, exact, [h_layers, h_kernels, h_float64])."""
    enc, exact = copy.deepcopy(ref), copy.deepcopy(ref).double()
    enc.cpu_kernels = True
    weights = torch.linspace(-1, 1, ref.out_dim)
    outs = []
    for e in (ref, enc, exact):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and e is not exact):
            h = e(x.double() if e is exact else x)
        (h.double() * weights.double()).sum().backward()
        outs.append(h.double())
    return enc, exact, outs


def _assert_as_close_as_aten(ref, enc, exact, outs, floor: float) -> None:
    """The kernels' output and every parameter's gradient within 1.5x of the layers' error from float64, or within
    ``floor`` of the value's scale."""
    pairs = [("output", outs[1], outs[0], outs[2])] + [
        (name, q.grad.double(), p.grad.double(), t.grad)
        for (name, p), q, t in zip(ref.named_parameters(), enc.parameters(), exact.parameters())]
    for name, fused, aten, truth in pairs:
        err_fused, err_aten = (fused - truth).abs().max(), (aten - truth).abs().max()
        assert err_fused <= max(1.5 * err_aten, floor * truth.abs().max()), (name, err_fused, err_aten)


@needs_kernels
@pytest.mark.parametrize("winograd", [False, True])
def test_cnn_encoder_in_f32_takes_the_convs_where_they_pay(kernel_calls, monkeypatch, winograd):
    """The cnn in f32 (a CPU without native bf16), kernels on and off, against float64: stages 2 and 3 take their
    weight gradient from kernels.conv3x3 where conv3x3_pays, and with ``winograd`` their forward and input gradient
    too (both forced on or off here, so the comparison runs on any CPU), and the output and every gradient are as
    close to float64 as ATen's (1.5x), or within 1e-5 of the scale (5e-5 with Winograd's F(4x4, 3x3): see
    test_conv3x3_winograd_against_float64)."""
    monkeypatch.setattr(kernels, "F32_WGRAD_LANES", (8, 16))
    monkeypatch.setattr(kernels, "WINOGRAD_LANES", (8, 16) if winograd else ())
    torch.manual_seed(0)
    ref = Encoder("cnn", width=16, embed_dim=64, in_channels=3, image_size=(32, 32)).to(memory_format=torch.channels_last)
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    enc, exact, outs = _layers_kernels_float64(ref, x, autocast=False)
    assert kernel_calls.get("conv3x3", 0) == 2 and kernel_calls.get("stem", 0) == 0
    _assert_as_close_as_aten(ref, enc, exact, outs, floor=5e-5 if winograd else 1e-5)
    assert not kernels.conv3x3_pays(x.bfloat16()) or kernels.has_bf16_dot()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.conv3x3_pays(x)          # f32 inside a bf16 region: ATen's conv would compute in bf16


@needs_kernels
def test_conv3x3_takes_only_what_it_computes():
    conv = torch.nn.Conv2d(32, 64, 3, padding=1, bias=False)
    x = torch.randn(2, 32, 8, 8).to(torch.bfloat16)
    assert kernels.conv3x3_supported(x, conv) and kernels.conv3x3_supported(x.float(), conv)
    assert not kernels.conv3x3_supported(x.double(), conv)
    assert not kernels.conv3x3_supported(x, torch.nn.Conv2d(32, 64, 3, padding=1))            # a bias
    assert not kernels.conv3x3_supported(x, torch.nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False))
    assert not kernels.conv3x3_supported(x, torch.nn.Conv2d(32, 64, 1, bias=False))
    assert not kernels.conv3x3_supported(x, torch.nn.Conv2d(32, 40, 3, padding=1, bias=False))
    assert not kernels.conv3x3_supported(x[:, :30], torch.nn.Conv2d(30, 64, 3, padding=1, bias=False))
    with torch.no_grad():
        assert not kernels.conv3x3_supported(x, conv)                                         # no gradient wanted


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 64, 48)])
def test_cnn_encoder_with_fused_bn_equals_layers(shape, kernel_calls):
    """The cnn at 3 x 32 x 32 (stage 3: BN -> ReLU -> average pool), 1 x 28 x 28 (BN -> ReLU) and 3 x 64 x 48 (BN ->
    ReLU fused, then ATen's 3 x 3 average pool), bf16 autocast and
    channels_last as training runs it, kernels on and off, each against the same network in float64: the fused
    path's output and gradients are as close to float64 as ATen's (within 1.5x of ATen's error, or 1e-3 of the
    value's scale), and its running statistics ATen's (the first BN's: as close to float64). In eval mode the fused kernel stays off (BN uses its
    running statistics there)."""
    torch.manual_seed(0)
    ref = Encoder("cnn", width=16, embed_dim=64, in_channels=shape[0], image_size=shape[1:])
    ref = ref.to(memory_format=torch.channels_last)
    x = torch.rand(8, *shape).contiguous(memory_format=torch.channels_last)
    enc, exact, outs = _layers_kernels_float64(ref, x, autocast=True)
    # where the CPU has AVX512-BF16: stage 1 whole (conv, BN, pool, ReLU), and the other convs' weight gradients
    fast = kernels.has_bf16_dot()
    assert (kernel_calls.get("stem", 0), kernel_calls.get("conv3x3", 0), kernel_calls.get("bn_act")) \
        == ((1, 2, 2) if fast else (0, 0, 3))
    _assert_as_close_as_aten(ref, enc, exact, outs, floor=1e-3)
    for (name, b), c, t in zip(ref.named_buffers(), enc.buffers(), exact.buffers()):
        if name.startswith("body.1.") and b.is_floating_point():
            # the first BN sees the same input on both paths: its statistics are as close to float64 as ATen's (the
            # stem takes them from the unrounded conv output, ATen from its bf16 rounding)
            err_fused, err_aten = (c.double() - t).abs().max(), (b.double() - t).abs().max()
            assert err_fused <= max(1.5 * err_aten, 1e-6 * t.abs().max()), (name, err_fused, err_aten)
        else:                                   # later ones see bf16-rounded activations
            torch.testing.assert_close(c.float(), b.float(), rtol=3e-2, atol=3e-3, msg=name)
    enc.load_state_dict(ref.state_dict())       # the same running statistics: eval mode runs the same layers
    ref.eval(), enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
    assert (kernel_calls.get("stem", 0), kernel_calls.get("bn_act")) == ((1, 2) if fast else (0, 3))


def test_no_compiler_warns_and_runtime_falls_back(monkeypatch, tmp_path):
    """No C compiler: one warning, load() is None, the Runtime leaves the kernels off, training still works."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FASTCLR_CACHE", str(tmp_path / "cache"))
    kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built"):
            assert kernels.load() is None
        assert not resolve_cpu_kernels(torch.device("cpu"))
        assert not kernels.pool_relu_supported(torch.rand(2, 16, 4, 4))
    finally:
        kernels.load.cache_clear()


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FASTCLR_CPU_KERNELS", "0")
    assert not make_runtime("cpu").cpu_kernels


@needs_kernels
def test_runtime_turns_kernels_on_for_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_runtime("cpu").cpu_kernels


# --------------------------------------------------------------------------- augmentation kernels

def _warps():
    """FusedWarp configurations: every frame combination, both padding modes, a non-square resize."""
    from conftest import only

    from fastclr.warp import FusedWarp

    return {"all": FusedWarp(only("crop", "affine", "elastic")),
            "no-crop (zero padding)": FusedWarp(only("affine", "elastic")),
            "crop+affine": FusedWarp(only("crop", "affine")),
            "crop+elastic": FusedWarp(only("crop", "elastic")),
            "resize to 20x36": FusedWarp(only("crop", "affine", "elastic"), (20, 36))}


@needs_kernels
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", list(_warps()))
def test_warp_sample_equals_fused_warps_pytorch_ops(name, channels, kernel_calls):
    """The same plan through the kernel and through grid + weight + grid_sample: equal to 1e-5, one channel and
    three (one grid for all)."""
    fw = _warps()[name]
    torch.manual_seed(0)
    x = torch.rand(37, channels, 28, 28)
    params = fw.draw(x.shape)
    fw.cpu_kernel = False
    ref = fw(x, params)
    fw.cpu_kernel = True
    out = fw(x, params)
    assert kernel_calls == {"warp_sample": 1}
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(9, 3, 32, 32), (5, 1, 2, 7), (4, 2, 13, 2)])
def test_blur_kernel_equals_pytorch_ops(shape, kernel_calls):
    """RandomBlur through the kernel and through its PyTorch passes on the same draws (some samples not blurred):
    equal to 1e-6, the samples not drawn exactly."""
    from fastclr.augment import RandomBlur

    torch.manual_seed(0)
    x = torch.rand(shape)
    blur = RandomBlur((0.1, 2.0), p=0.6)
    params = blur.draw(shape[0], x.device)
    ref = blur(x, params)
    blur.cpu_kernel = True
    out = blur(x, params)
    assert kernel_calls == {"blur3": 1}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    kept = params["batch_prob"] == 0
    assert kept.any() and torch.equal(out[kept], x[kept])


@needs_kernels
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_equals_pytorch_ops(per_channel, channels_last):
    """(x - mean) / std, channels_last out: exactly ATen's in f32, and exactly autocast's bf16 cast of it."""
    x = torch.rand(5, 3, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = (torch.tensor([0.2, 0.5, 0.7]).view(3, 1, 1), torch.tensor([0.3, 0.25, 0.1]).view(3, 1, 1)) \
        if per_channel else (torch.tensor(0.1307), torch.tensor([0.3081]).view(1, 1, 1))
    ref = (x - mean) / std
    out = kernels.normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.normalize(x, mean, std)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())


@needs_kernels
def test_warp_with_kornias_dense_noise_uses_pytorch_ops():
    """The exact (per-pixel noise) elastic field has no low-rank core: FusedWarp keeps PyTorch's ops."""
    from conftest import only

    from fastclr.warp import FusedWarp

    fw = FusedWarp(only("elastic", elastic_p=1.0), elastic_rank=None, cpu_kernel=True)
    x = torch.rand(4, 1, 28, 28)
    params = fw.draw(x.shape)
    grid, inside = fw.maps(fw.plan(x, params))
    torch.testing.assert_close(fw(x, params), F.grid_sample(x, grid, align_corners=True))


@needs_kernels
@pytest.mark.parametrize("p", [0.5, 1.0])
@pytest.mark.parametrize("hw", [(28, 28), (5, 33)])
def test_thickness_kernel_equals_max_filter_exactly(p, hw, kernel_calls):
    from fastclr.augment import RandomThickness

    x = torch.rand(50, 1, *hw)
    x[:, :, : hw[0] // 2] = 0
    torch.manual_seed(3)
    ref = RandomThickness(p)(x)
    torch.manual_seed(3)
    out = RandomThickness(p, cpu_kernel=True)(x)
    assert kernel_calls == {"thickness": 1}
    assert torch.equal(out, ref)
    assert not torch.equal(out, x)


@needs_kernels
def test_simclr_augment_with_kernels_matches_pytorch_ops(kernel_calls):
    from fastclr.augment import SimCLRAugment

    x = torch.rand(64, 1, 28, 28)
    torch.manual_seed(7)
    ref = SimCLRAugment()(x)
    torch.manual_seed(7)
    assert not kernel_calls
    out = SimCLRAugment(cpu_kernels=True)(x)
    assert kernel_calls == {"thickness": 1, "warp_sample": 1}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_compiled_runs_keep_the_kernels(monkeypatch):
    """The kernels are torch.library ops, so --compile keeps them (they used to be switched off for it)."""
    import fastclr.backend as B

    monkeypatch.setattr(B, "compile_available", lambda: True)
    assert B.make_runtime("cpu", compile=True).cpu_kernels == kernels.available()


def _op_samples():
    """(op, args) for every kernel op, at small shapes; autograd inputs where training needs a gradient."""
    from conftest import only

    from fastclr.warp import FusedWarp

    g = torch.Generator().manual_seed(0)
    pool_x = [torch.randn(2, 16, 4, 6, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
              .requires_grad_() for dt in (torch.float32, torch.bfloat16)]
    conv = torch.nn.Conv2d(1, 16, 3, padding=1)
    fw = FusedWarp(only("crop", "affine", "elastic", translate=0.0, shear=0.0, zoom=(1.0, 1.0), elastic_p=1.0))
    x = torch.rand(3, 1, 28, 28, generator=g)
    plan = fw.plan(x, fw.draw(x.shape))
    bn = torch.nn.BatchNorm2d(16)
    bn_ops = [(torch.ops.fastclr.bn_act.default, (px, bn.weight, bn.bias, 1e-5, mode))
              for px in pool_x for mode in (kernels.BN_RELU, kernels.BN_MAXPOOL_RELU, kernels.BN_RELU_AVGPOOL)]
    y = pool_x[1].detach()
    bout, bidx, bymax, bmean, bvar = torch.ops.fastclr.bn_act(y, bn.weight.detach(), bn.bias.detach(), 1e-5,
                                                              kernels.BN_MAXPOOL_RELU)
    bn_ops.append((torch.ops.fastclr.bn_act_backward.default,
                   (torch.randn_like(bout), y, bidx, bymax, bn.weight.detach(), bn.bias.detach(), bmean, bvar, 1e-5,
                    kernels.BN_MAXPOOL_RELU)))
    sconv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
    sx = torch.rand(2, 3, 6, 8).to(torch.bfloat16)
    sout, sidx, symax, smean, svar, sxp, sy = torch.ops.fastclr.stem(sx, sconv.weight.detach(), bn.weight.detach(),
                                                                     bn.bias.detach(), 1e-5, None, None)
    bn_ops += [(torch.ops.fastclr.stem.default, (sx, sconv.weight, bn.weight, bn.bias, 1e-5, None, None)),
               (torch.ops.fastclr.stem.default, (torch.rand(2, 3, 6, 8), sconv.weight, bn.weight, bn.bias, 1e-5,
                                                 torch.tensor([0.4, 0.5, 0.6]), torch.tensor(0.25))),
               (torch.ops.fastclr.stem_backward.default,
                (torch.randn_like(sout), sxp, sy, sidx, symax, sconv.weight.detach(), bn.weight.detach(), bn.bias.detach(),
                 smean, svar, 1e-5))]
    wx = torch.randn(2, 8, 6, 8).to(torch.bfloat16)
    wy = torch.randn(2, 16, 5, 7)
    bn_ops += [(torch.ops.fastclr.conv3x3.default, (wx, torch.randn(16, 8, 3, 3), False)),
               (torch.ops.fastclr.conv3x3_wgrad.default, (torch.randn(2, 16, 6, 8).to(torch.bfloat16), wx, False)),
               (torch.ops.fastclr.conv3x3.default, (wx.float(), torch.randn(16, 8, 3, 3), False)),
               (torch.ops.fastclr.conv3x3_wgrad.default, (torch.randn(2, 16, 6, 8), wx.float(), False)),
               (torch.ops.fastclr.conv3x3.default, (wy, torch.randn(32, 16, 3, 3), True)),
               (torch.ops.fastclr.conv3x3_wgrad.default, (torch.randn(2, 32, 5, 7), wy, True))]
    out, idx = torch.ops.fastclr.pool_relu(pool_x[0].detach())
    cout, cidx = torch.ops.fastclr.conv3x3_pool_relu(x, conv.weight.detach(), conv.bias.detach(), 0.13, 0.31, False)
    backward_ops = [(torch.ops.fastclr.pool_relu_backward.default, (torch.randn_like(out), out, idx)),
                    (torch.ops.fastclr.conv3x3_pool_relu_backward.default,
                     (torch.randn_like(cout), x, cout, cidx, 0.13, 0.31))]
    return ([(torch.ops.fastclr.pool_relu.default, (px,)) for px in pool_x] + backward_ops + bn_ops
            + [(torch.ops.fastclr.conv3x3_pool_relu.default, (x, conv.weight, conv.bias, 0.13, 0.31, bf16))
               for bf16 in (False, True)]
            + [(torch.ops.fastclr.warp_sample.default, (x, plan.core, plan.ybasis, plan.xbasis, plan.frames, 28, 28,
                                                        True)),
               (torch.ops.fastclr.warp_sample.default, (x.expand(3, 3, 28, 28).contiguous(), plan.core, plan.ybasis,
                                                        plan.xbasis, plan.frames, 28, 28, False)),
               (torch.ops.fastclr.thickness.default, (x, torch.tensor([1.0, -1.0, 0.0]))),
               (torch.ops.fastclr.normalize.default, (x.expand(3, 3, 28, 28).contiguous(), torch.tensor([0.1, 0.2, 0.3]),
                                                      torch.tensor([0.3, 0.2, 0.1]), True)),
               (torch.ops.fastclr.blur3.default, (x.expand(3, 3, 28, 28).contiguous(), torch.tensor([0.2, 0.0, 0.1]))),
               (torch.ops.fastclr.color_jitter.default,
                (x.expand(3, 3, 28, 28).contiguous(), torch.tensor([[1.0, 1.2, 0.8, 1.1, 0.05, 1.0]] * 3)))])


@needs_kernels
def test_every_kernel_op_passes_opcheck():
    """torch.library.opcheck: schema, fake function, autograd registration and AOT dispatch agree with the
    real kernel for each op."""
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


@needs_kernels
def test_kernels_follow_torch_set_num_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert kernels.team_size() == n
            kernels.pool_relu(torch.randn(2, 16, 4, 4))     # and a kernel runs with that team
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.slow
def test_compiled_encoder_with_kernels_equals_eager(kernel_calls):
    """torch.compile(fullgraph=True) of the tutorial encoder with the kernels: one graph (no break into
    ctypes), the kernels inside it, and the eager outputs and gradients."""
    torch.manual_seed(0)
    enc = Encoder("tutorial").to(memory_format=torch.channels_last)
    enc.cpu_kernels = True
    x = torch.rand(8, 1, 28, 28)
    outs = []
    for fn in (enc, torch.compile(enc, fullgraph=True)):
        enc.zero_grad()
        h = fn(x)
        h.sum().backward()
        outs.append((h.detach(), [p.grad.clone() for p in enc.parameters()]))
    assert kernel_calls.get("conv3x3_pool_relu", 0) >= 1
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which(os.environ.get("CC", "cc")) is None,
                    reason="the kernels build on Linux with a C compiler only")
def test_kernels_build_and_pass_their_self_check_here():
    """Where a C compiler is there, the kernels must be available: a kernel broken badly enough to fail the
    load-time self-check would otherwise only skip the tests above (with a warning), never fail them."""
    assert kernels.available()


@needs_kernels
def test_colour_views_take_the_kernels_channel_by_channel(kernel_calls):
    """3-channel images: the warp and thickness kernels run on B x C one-channel samples with each sample's
    parameters repeated per channel, equal to the PyTorch ops (warp to 1e-5, thickness exactly)."""
    from conftest import only

    from fastclr.augment import RandomThickness
    from fastclr.warp import FusedWarp

    x = torch.rand(20, 3, 32, 32)
    fw = FusedWarp(only("flip", "crop", "affine", "elastic"))
    torch.manual_seed(1)
    params = fw.draw(x.shape)
    ref = fw(x, params)
    fw.cpu_kernel = True
    torch.testing.assert_close(fw(x, params), ref, rtol=0, atol=1e-5)
    torch.manual_seed(2)
    ref = RandomThickness(1.0)(x)
    torch.manual_seed(2)
    assert torch.equal(RandomThickness(1.0, cpu_kernel=True)(x), ref)
    assert kernel_calls == {"warp_sample": 1, "thickness": 1}
