import pytest
import torch

from fastclr.backend import FastclrError
from fastclr.model import CHECKPOINT_FORMAT, Encoder, build_model, load_encoder


@pytest.mark.parametrize("arch", ["cnn", "tutorial"])
def test_shapes(arch):
    m = build_model(arch, 8, 32, 64, 16, 0.13, 0.31)
    z = m(torch.rand(5, 1, 28, 28))
    assert z.shape == (5, 16)
    assert m.encoder(torch.rand(5, 1, 28, 28)).shape == (5, 32)


def test_channels_last_gives_same_output():
    torch.manual_seed(0)
    m = build_model("cnn", 8, 32, 64, 16, 0.13, 0.31).eval()
    x = torch.rand(4, 1, 28, 28)
    ref = m(x)
    m = m.to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)


def test_load_encoder_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = Encoder("cnn", 8, 32, 0.2, 0.3).eval()
    path = tmp_path / "c.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "encoder_hparams": enc.hparams, "encoder": enc.state_dict(),
                "config": {}}, path)
    loaded = load_encoder(path)
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
