"""Encoders (a small registry), the SimCLR projection head, and checkpoint loading.

Evaluation uses the encoder output ``h``, not the head output ``z``: SimCLR (section 4.2) shows the
representation before the projection head is markedly better for downstream tasks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .errors import FastclrError
from .checkpoint import encoder_state, read_checkpoint


# ReLU then 2x2 max-pool equals max-pool then ReLU, values and gradients (max is monotone, so both pick the
# same first maximum, and ReLU's mask of it is the same), but pooling first runs the ReLU and its backward
# on a quarter of the elements (timing: docs/design.md, "Measurements behind the code"). tests/test_model.py
# checks the equality.
def _pool_relu() -> list[nn.Module]:
    return [nn.MaxPool2d(2), nn.ReLU(inplace=True)]


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


def _tutorial_body(embed_dim: int) -> tuple[nn.Module, int]:
    """The tutorial's network: 2 convs (16, 32) each followed by ReLU and a 2x2 max-pool (applied as pool,
    then ReLU: the same function, see above), a linear layer and a ReLU. Same parameters, same state-dict keys."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), *_pool_relu(),
        nn.Conv2d(16, 32, 3, padding=1), *_pool_relu(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, embed_dim), nn.ReLU(),
    ), embed_dim


def _cnn_body(width: int, embed_dim: int) -> tuple[nn.Module, int]:
    """3 conv-BN-ReLU stages (width, 2w, 4w) at 28, 14 and 7 pixels, then a linear layer to embed_dim.
    BatchNorm lets SimCLR train at a high learning rate; the 7x7 map is flattened, not pooled, because
    on 28x28 digits *where* a stroke is carries information that global pooling throws away."""
    w = width
    return nn.Sequential(
        *_conv_bn(1, w), *_pool_relu(),
        *_conv_bn(w, 2 * w), *_pool_relu(),
        *_conv_bn(2 * w, 4 * w), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * w * 7 * 7, embed_dim, bias=False), nn.BatchNorm1d(embed_dim),
        nn.ReLU(inplace=True),
    ), embed_dim


ARCHS = {
    "tutorial": lambda width, embed_dim: _tutorial_body(embed_dim),
    "cnn": _cnn_body,
}


class Encoder(nn.Module):
    """Maps float images in [0, 1] to embeddings; the dataset normalisation lives inside.

    Shape:
        x: (B, 1, 28, 28) float in [0, 1]. Output: (B, embed_dim).
    """

    def __init__(self, arch: str = "cnn", width: int = 16, embed_dim: int = 128,
                 mean: float = 0.1307, std: float = 0.3081):
        super().__init__()
        if arch not in ARCHS:
            raise FastclrError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        self.hparams = dict(arch=arch, width=width, embed_dim=embed_dim, mean=mean, std=std)
        self.body, self.out_dim = ARCHS[arch](width, embed_dim)
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.cpu_kernels = False    # set by fastclr.train from the Runtime (fastclr.backend decides)

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_kernels:
            return self._forward_with_kernels(x)
        return self.body((x - self.mean) / self.std)

    def _forward_with_kernels(self, x: Tensor) -> Tensor:
        """``body`` run with fastclr.kernels where a layer pattern and its input allow, else layer by layer:
        Conv2d(1, C, 3) -> MaxPool2d(2) -> ReLU at the start becomes one kernel (normalisation included), and
        every later MaxPool2d(2) -> ReLU pair another. The same function (tests/test_kernels.py)."""
        layers = list(self.body)
        i = 0
        if _is_pool_relu(layers, 1) and isinstance(layers[0], nn.Conv2d) \
                and kernels.conv3x3_pool_relu_supported(x, layers[0]):
            x, i = kernels.conv3x3_pool_relu(x, layers[0], self.hparams["mean"], self.hparams["std"]), 3
        else:
            x = (x - self.mean) / self.std
        while i < len(layers):
            if _is_pool_relu(layers, i) and kernels.pool_relu_supported(x):
                x, i = kernels.pool_relu(x), i + 2
            else:
                x, i = layers[i](x), i + 1
        return x


def _is_pool_relu(layers: list[nn.Module], i: int) -> bool:
    """layers[i:i + 2] is a plain 2x2 max-pool followed by a ReLU."""
    if i + 1 >= len(layers) or not isinstance(layers[i], nn.MaxPool2d) or not isinstance(layers[i + 1], nn.ReLU):
        return False
    p = layers[i]
    return (p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2)) and p.padding in (0, (0, 0))
            and p.dilation in (1, (1, 1)) and not p.ceil_mode and not p.return_indices)


class ProjectionHead(nn.Module):
    """SimCLR's MLP head g(h) = W2 ReLU(BN(W1 h)) (BN optional). Shape: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 64, bn: bool = True):
        super().__init__()
        norm = [nn.BatchNorm1d(hidden_dim)] if bn else []
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=not bn), *norm,
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class SimCLRModel(nn.Module):
    """Encoder + head. Shape: (B, 1, 28, 28) -> z (B, proj_dim)."""

    def __init__(self, encoder: Encoder, head: ProjectionHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def build_model(arch: str, width: int, embed_dim: int, proj_hidden: int, proj_dim: int,
                mean: float, std: float, proj_bn: bool = True) -> SimCLRModel:
    encoder = Encoder(arch, width, embed_dim, mean, std)
    return SimCLRModel(encoder, ProjectionHead(encoder.out_dim, proj_hidden, proj_dim, proj_bn))


def load_encoder(path: str | Path, map_location="cpu") -> Encoder:
    """Rebuild the trained encoder from a checkpoint, in eval mode.

    The result maps float images in [0, 1] of shape (B, 1, 28, 28) to embeddings (B, D).
    """
    hparams, weights = encoder_state(read_checkpoint(path, map_location))
    encoder = Encoder(**hparams)
    encoder.load_state_dict(weights)
    return encoder.eval()
