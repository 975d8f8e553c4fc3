import pytest
import torch

from fastclr.backend import FastclrError
from fastclr.checkpoint import CHECKPOINT_FORMAT
from fastclr.model import Encoder, build_model, load_encoder


@pytest.mark.parametrize("arch", ["cnn", "tutorial"])
def test_shapes(arch):
    m = build_model(arch, 8, 32, 64, 16, (0.13, 0.31))
    z = m(torch.rand(5, 1, 28, 28))
    assert z.shape == (5, 16)
    assert m.encoder(torch.rand(5, 1, 28, 28)).shape == (5, 32)


def test_channels_last_gives_same_output():
    torch.manual_seed(0)
    m = build_model("cnn", 8, 32, 64, 16, (0.13, 0.31)).eval()
    x = torch.rand(4, 1, 28, 28)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


def round_trip(enc, path):
    """``enc`` saved as a checkpoint holding only its encoder, and loaded back with load_encoder."""
    torch.save({"format": CHECKPOINT_FORMAT, "encoder_hparams": enc.hparams, "encoder": enc.state_dict(),
                "config": {}}, path)
    return load_encoder(path)


def test_load_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = Encoder("cnn", 8, 32, 0.2, 0.3).eval()
    loaded = round_trip(enc, tmp_path / "c.pt")
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), enc(x))


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(FastclrError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastclrError, match="cannot be read"):
        load_encoder(tmp_path / "junk.pt")
    torch.save({"format": CHECKPOINT_FORMAT + 1, "encoder": {}, "encoder_hparams": {}}, tmp_path / "new.pt")
    with pytest.raises(FastclrError, match="format"):
        load_encoder(tmp_path / "new.pt")
    with pytest.raises(FastclrError, match="unknown arch"):
        Encoder("resnet")


def _literal_tutorial_net(embed_dim=32):
    """The tutorial's SimpleCNN.encoder as published: ReLU before each max-pool."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, embed_dim), nn.ReLU())


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pool_then_relu_equals_the_tutorials_relu_then_pool(batch, dtype):
    """fastclr's tutorial body pools before its ReLUs (faster); with the same weights, outputs and every
    parameter gradient must equal the literal tutorial network's (exact: the same elements are selected and
    summed in the same order; asserted with rtol 0 and atol 1e-6 for float32 reduction-order slack)."""
    torch.manual_seed(batch)
    ours = Encoder("tutorial", embed_dim=32, mean=0.0, std=1.0).to(dtype)
    ref = _literal_tutorial_net(32).to(dtype)
    ref.load_state_dict(ours.body.state_dict())          # same keys: the swap moved no parameters
    x = torch.rand(batch, 1, 28, 28, dtype=dtype)
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=1e-6)
    g = torch.randn_like(y_ref)
    y_ours.backward(g)
    y_ref.backward(g)
    for (name, p), q in zip(ours.body.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)


def test_cnn_body_pools_batchnormed_features_before_relu():
    """cnn: conv-BN-pool-ReLU equals conv-BN-ReLU-pool (BN precedes both), checked on a trained-looking BN
    with negative scales too."""
    from torch import nn

    torch.manual_seed(0)
    enc = Encoder("cnn", width=4, embed_dim=8, mean=0.0, std=1.0).eval()
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1, 1)
            m.running_mean.uniform_(-0.5, 0.5)
    body = list(enc.body)
    reordered = nn.Sequential(*body[0:2], body[3], body[2], *body[4:6], body[7], body[6], *body[8:]).eval()
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(enc(x), reordered(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- any channel count and image size

@pytest.mark.parametrize("arch", ["cnn", "tutorial"])
@pytest.mark.parametrize("c, hw, pooled, cells", [(1, (28, 28), False, 49), (3, (32, 32), True, 16),
                                                  (3, (96, 96), True, 36), (1, (8, 8), False, 4),
                                                  (3, (20, 36), False, 45)])
def test_encoders_take_any_channels_and_size(arch, c, hw, pooled, cells):
    """The final map (H/4 x W/4) is flattened up to 7 x 7 cells, else average-pooled with an integer stride to at
    most 7 x 7; the linear layer sees 4w (cnn) or 32 (tutorial) channels x that many cells."""
    enc = Encoder(arch, 8, 24, mean=[0.5] * c if c > 1 else 0.5, std=[0.25] * c if c > 1 else 0.25,
                  in_channels=c, image_size=hw).eval()
    assert enc(torch.rand(2, c, *hw)).shape == (2, 24)
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in enc.body) == pooled
    linear = next(m for m in enc.body if isinstance(m, torch.nn.Linear))
    assert linear.in_features == (32 if arch == "cnn" else 32) * cells
    assert next(m for m in enc.body if isinstance(m, torch.nn.Conv2d)).in_channels == c


def test_per_channel_statistics_normalise_each_channel():
    enc = Encoder("cnn", 4, 8, mean=[0.1, 0.5, 0.9], std=[1.0, 2.0, 4.0], in_channels=3, image_size=(8, 8))
    assert enc.mean.shape == (3, 1, 1) and enc.std.shape == (3, 1, 1)
    seen = {}
    enc.body.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.rand(2, 3, 8, 8)
    enc(x)
    torch.testing.assert_close(seen["x"][:, 1], (x[:, 1] - 0.5) / 2.0)
    with pytest.raises(FastclrError, match="2 per-channel statistics for 3"):
        Encoder("cnn", 4, 8, mean=[0.1, 0.5], std=[1.0, 2.0], in_channels=3)


def test_a_colour_encoder_round_trips_through_load_encoder(tmp_path):
    torch.manual_seed(0)
    enc = Encoder("cnn", 8, 16, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25], in_channels=3, image_size=(32, 32)).eval()
    loaded = round_trip(enc, tmp_path / "c.pt")
    assert loaded.hparams["in_channels"] == 3 and tuple(loaded.hparams["image_size"]) == (32, 32)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), enc(x))


def test_images_too_small_for_two_pools_are_one_clear_error():
    with pytest.raises(FastclrError, match="too small"):
        Encoder("cnn", 4, 8, in_channels=1, image_size=(3, 28))


# ----------------------------------------------------------------------- resnet18

def test_resnet18_is_the_cifar_variant_at_the_standard_size():
    """3x3 stride-1 stem, no max-pool, four stages of two basic blocks; at width 32 the standard 64-512 network
    (11.17 M parameters, the CIFAR ResNet-18 of lightly's and solo-learn's benchmarks) with 512-d features."""
    enc = Encoder("resnet18", 32, 128, in_channels=3, image_size=(32, 32))
    stem = enc.body[0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((3, 3), (1, 1), 64)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in enc.modules())
    assert enc.out_dim == 512
    assert round(sum(p.numel() for p in enc.parameters()) / 1e4) == 1117


@pytest.mark.parametrize("c, hw", [(3, (32, 32)), (1, (28, 28)), (3, (96, 96)), (1, (8, 8))])
def test_resnet18_takes_one_or_three_channels_at_any_size(c, hw):
    enc = Encoder("resnet18", 2, 8, mean=[0.5] * c, std=[0.25] * c, in_channels=c, image_size=hw).eval()
    assert enc(torch.rand(2, c, *hw)).shape == (2, 32)
    with pytest.raises(FastclrError, match="at least 8x8"):
        Encoder("resnet18", 2, 8, in_channels=c, image_size=(6, 6))


def test_resnet18_round_trips_through_load_encoder_and_channels_last(tmp_path):
    torch.manual_seed(0)
    enc = Encoder("resnet18", 4, 8, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25], in_channels=3, image_size=(32, 32)).eval()
    loaded = round_trip(enc, tmp_path / "r.pt")
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), enc(x))
    cl = loaded.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), enc(x), rtol=1e-4, atol=1e-5)
