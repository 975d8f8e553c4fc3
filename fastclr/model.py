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


MAX_CELLS = 49     # the largest final map flattened as it is (7 x 7: MNIST's, at 28 pixels)


def _final_grid(image_size: tuple[int, int]) -> tuple[list[nn.Module], int]:
    """What follows the last conv stage (the image pooled twice, H/4 x W/4): nothing where that map has at most
    49 cells, else an average pool of stride k = ceil(max side / 7) (to at most 7 x 7). Small images are
    flattened because on digits and clothing *where* a stroke or an edge is carries information that a
    global pool throws away; large ones are pooled so the linear layer stays the size it has at 28 pixels.
    Returns the layers and the grid's cell count."""
    fh, fw = image_size[0] // 4, image_size[1] // 4
    if fh < 1 or fw < 1:
        raise FastclrError(f"images of {image_size[0]}x{image_size[1]} pixels are too small for the encoders "
                           "(two 2x2 pools need at least 4x4); pass a larger --image-size")
    if fh * fw <= MAX_CELLS:
        return [], fh * fw
    k = -(-max(fh, fw) // 7)
    return [nn.AvgPool2d(k, ceil_mode=True)], (-(-fh // k)) * (-(-fw // k))


def _tutorial_body(embed_dim: int, in_channels: int, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """The tutorial's network: 2 convs (16, 32) each followed by ReLU and a 2x2 max-pool (applied as pool,
    then ReLU: the same function, see above), a linear layer and a ReLU. Same parameters, same state-dict keys
    at 28 x 28."""
    grid, cells = _final_grid(image_size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), *_pool_relu(),
        nn.Conv2d(16, 32, 3, padding=1), *_pool_relu(), *grid,
        nn.Flatten(), nn.Linear(32 * cells, embed_dim), nn.ReLU(),
    ), embed_dim


def _cnn_body(width: int, embed_dim: int, in_channels: int, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """3 conv-BN-ReLU stages (width, 2w, 4w) at full, half and quarter resolution, then (see _final_grid) a
    linear layer to embed_dim. BatchNorm lets SimCLR train at a high learning rate."""
    w = width
    grid, cells = _final_grid(image_size)
    return nn.Sequential(
        *_conv_bn(in_channels, w), *_pool_relu(),
        *_conv_bn(w, 2 * w), *_pool_relu(),
        *_conv_bn(2 * w, 4 * w), nn.ReLU(inplace=True), *grid,
        nn.Flatten(), nn.Linear(4 * w * cells, embed_dim, bias=False), nn.BatchNorm1d(embed_dim),
        nn.ReLU(inplace=True),
    ), embed_dim


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BN, a ReLU between, the input added back (through a strided 1x1 conv-BN
    where the shape changes), then a ReLU. Shape: (B, c_in, H, W) -> (B, c_out, H / stride, W / stride)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet18_body(width: int, embed_dim: int, in_channels: int, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """ResNet-18, the CIFAR variant of SimCLR's CIFAR-10 experiments and of lightly's and solo-learn's benchmarks:
    a 3x3 stride-1 stem without the max-pool (the ImageNet stem's 7x7 stride 2 and pool would leave a 32 px image
    1 x 1 after the last stage), four stages of two basic blocks at 2w, 4w, 8w, 16w channels (w = ``width``: the
    default 32 is the standard 64 to 512), strides 1, 2, 2, 2, and a global average pool. The representation is
    the pooled 16w features, as in SimCLR; ``embed_dim`` does not apply. Train it on a CPU with ``width`` >= 8: with
    fewer than 16 input channels to a strided 1x1 shortcut, oneDNN's channels_last weight gradient for it can hang
    or crash (oneDNN issue 6035)."""
    if min(image_size) < 8:
        raise FastclrError(f"resnet18 needs images of at least 8x8 pixels, got {image_size[0]}x{image_size[1]}")
    c = [2 * width, 4 * width, 8 * width, 16 * width]
    stages, c_in = [], c[0]
    for i, c_out in enumerate(c):
        stages.append(nn.Sequential(BasicBlock(c_in, c_out, 1 if i == 0 else 2), BasicBlock(c_out, c_out)))
        c_in = c_out
    return nn.Sequential(
        nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(inplace=True),
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ), c[-1]


ARCHS = {
    "tutorial": lambda width, embed_dim, in_channels, image_size: _tutorial_body(embed_dim, in_channels, image_size),
    "cnn": _cnn_body,
    "resnet18": _resnet18_body,
}


class Encoder(nn.Module):
    """Maps float images in [0, 1] to embeddings; the dataset normalisation lives inside.

    Args:
        mean, std: the training pixels' statistics: one number (every channel alike, as for MNIST), or one per
            channel.
        in_channels, image_size: the input's C and (H, W) (checkpoints written before these existed were
            1 x 28 x 28, their defaults).

    Shape:
        x: (B, in_channels, *image_size) float in [0, 1]. Output: (B, embed_dim).
    """

    def __init__(self, arch: str = "cnn", width: int = 16, embed_dim: int = 128, mean=0.1307, std=0.3081,
                 in_channels: int = 1, image_size: tuple[int, int] = (28, 28)):
        super().__init__()
        if arch not in ARCHS:
            raise FastclrError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
        image_size = tuple(image_size)
        self.hparams = dict(arch=arch, width=width, embed_dim=embed_dim, mean=mean, std=std,
                            in_channels=in_channels, image_size=image_size)
        self.body, self.out_dim = ARCHS[arch](width, embed_dim, in_channels, image_size)
        # a number stays a 0-d buffer (every checkpoint before per-channel statistics holds one); a sequence is
        # (C, 1, 1), broadcast over (B, C, H, W)
        self.register_buffer("mean", _stat(mean, in_channels))
        self.register_buffer("std", _stat(std, in_channels))
        self.cpu_kernels = False    # set by fastclr.train from the Runtime (fastclr.backend decides)

    def forward(self, x: Tensor) -> Tensor:
        if self.cpu_kernels:
            return self._forward_with_kernels(x)
        return self.body((x - self.mean) / self.std)

    def _forward_with_kernels(self, x: Tensor) -> Tensor:
        """``body`` run with fastclr.kernels where a layer pattern and its input allow, else layer by layer:
        Conv2d(1, C, 3) -> MaxPool2d(2) -> ReLU at the start becomes one kernel (normalisation included), else
        in training under bf16 autocast the normalisation, a first conv and its BatchNorm2d -> MaxPool2d(2) ->
        ReLU become one (kernels.stem), else the normalisation before a first conv is one (written as the conv's
        input dtype under autocast); in training, BatchNorm2d followed by MaxPool2d(2) -> ReLU, by ReLU ->
        AvgPool2d(2) or by ReLU becomes one (kernels.bn_act); every other MaxPool2d(2) -> ReLU pair another; other
        3x3 convs take their weight gradient from kernels.conv3x3 in training where it beats ATen's
        (kernels.conv3x3_pays: bf16 with AVX512-BF16, f32 on AVX2), and in f32 on AVX2 their forward and input
        gradient too, by Winograd's algorithm (kernels.winograd_supported). The same function, to float rounding
        (tests/test_kernels.py, tests/test_model.py)."""
        layers = list(self.body)
        i = 0
        if _is_pool_relu(layers, 1) and isinstance(layers[0], nn.Conv2d) \
                and kernels.conv3x3_pool_relu_supported(x, layers[0]):
            x, i = kernels.conv3x3_pool_relu(x, layers[0], _scalar(self.hparams["mean"]),
                                             _scalar(self.hparams["std"])), 3
        elif _bn_pattern(layers, 1)[0] == kernels.BN_MAXPOOL_RELU and kernels.has_bf16_dot() \
                and kernels.stem_supported(x, layers[0], layers[1], raw=True):
            x, i = kernels.stem(x, layers[0], layers[1], self.mean, self.std), 4
        elif isinstance(layers[0], nn.Conv2d) and kernels.normalize_supported(x):
            x = kernels.normalize(x, self.mean, self.std)
        else:
            x = (x - self.mean) / self.std
        while i < len(layers):
            mode, span = _bn_pattern(layers, i)
            if mode is not None and kernels.bn_act_supported(x, layers[i], mode):
                x, i = kernels.bn_act(x, layers[i], mode), i + span
            elif _is_pool_relu(layers, i) and kernels.pool_relu_supported(x):
                x, i = kernels.pool_relu(x), i + 2
            elif kernels.conv3x3_pays(x) and kernels.conv3x3_supported(x, layers[i]):
                x, i = kernels.conv3x3(x, layers[i]), i + 1
            else:
                x, i = layers[i](x), i + 1
        return x


def _stat(v, channels: int) -> Tensor:
    if isinstance(v, (int, float)):
        return torch.tensor(float(v))
    if len(v) != channels:
        raise FastclrError(f"{len(v)} per-channel statistics for {channels} channel(s)")
    return torch.tensor([float(c) for c in v]).view(-1, 1, 1)


def _scalar(v) -> float:
    """A one-channel statistic as the number it was given as (the first block's kernel takes one)."""
    return float(v) if isinstance(v, (int, float)) else float(v[0])


def _bn_pattern(layers: list[nn.Module], i: int) -> tuple[int | None, int]:
    """Which fused BN kernel mode the layers from i on match, and how many layers it replaces ((None, 0): none)."""
    if not isinstance(layers[i], nn.BatchNorm2d) or i + 1 >= len(layers):
        return None, 0
    if _is_pool_relu(layers, i + 1):
        return kernels.BN_MAXPOOL_RELU, 3
    if not isinstance(layers[i + 1], nn.ReLU):
        return None, 0
    if i + 2 < len(layers) and isinstance(layers[i + 2], nn.AvgPool2d):
        p = layers[i + 2]
        if p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2)) and p.padding in (0, (0, 0)) \
                and p.divisor_override is None:
            return kernels.BN_RELU_AVGPOOL, 3
    return kernels.BN_RELU, 2               # (before another pool: BN and ReLU fused, then ATen's pool)


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
    """Encoder + head. Shape: (B, C, H, W) -> z (B, proj_dim)."""

    def __init__(self, encoder: Encoder, head: ProjectionHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def build_model(arch: str, width: int, embed_dim: int, proj_hidden: int, proj_dim: int, norm=(0.1307, 0.3081),
                proj_bn: bool = True, input_shape: tuple[int, int, int] = (1, 28, 28)) -> SimCLRModel:
    """Encoder + projection head. ``norm``: the pixels' (mean, std), numbers or per-channel sequences;
    ``input_shape``: the images' (C, H, W)."""
    encoder = Encoder(arch, width, embed_dim, norm[0], norm[1], input_shape[0], input_shape[1:])
    return SimCLRModel(encoder, ProjectionHead(encoder.out_dim, proj_hidden, proj_dim, proj_bn))


def load_encoder(path: str | Path, map_location="cpu") -> Encoder:
    """Rebuild the trained encoder from a checkpoint, in eval mode.

    The result maps float images in [0, 1] of shape (B, C, H, W), as trained (``encoder.hparams`` holds
    ``in_channels`` and ``image_size``), to embeddings (B, D).
    """
    hparams, weights = encoder_state(read_checkpoint(path, map_location))
    encoder = Encoder(**hparams)
    encoder.load_state_dict(weights)
    return encoder.eval()
