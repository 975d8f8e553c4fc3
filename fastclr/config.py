"""The one training configuration: a typed dataclass with documented defaults; the CLI is generated from it.

Every field becomes a flag (``batch_size`` -> ``--batch-size``; booleans get ``--x/--no-x``), its help is
the field's ``help`` metadata, and the resolved config is saved in ``metrics.json`` and the checkpoint.
The defaults are the ``mnist`` recipe; :func:`resolve_config` applies a named recipe (``fastclr.recipes``)
under the flags given on the command line: defaults < recipe < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from . import recipes
from .backend import FastclrError


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    recipe: str = _f("mnist", "named recipe (fastclr.recipes; default: the dataset's own, mnist or fashion-mnist); "
                              "flags given with it override its fields", list(recipes.RECIPES))
    # data
    dataset: str = _f("mnist", "dataset to train on", ["mnist", "fashion-mnist"])
    data_dir: typing.Optional[str] = _f(None, "dataset root holding MNIST/raw or FashionMNIST/raw "
                                               "(default: $FASTCLR_DATA, else ./data; downloaded when missing)")
    loader: str = _f("device", "device: whole uint8 dataset on the device, augmented there with Kornia; "
                               "torchvision: DataLoader with per-sample CPU transforms", ["device", "torchvision"])
    workers: int = _f(2, "DataLoader worker processes for --loader torchvision")
    train_subset: int = _f(0, "train on the first N training images only (0: all); for quick tests")
    # model
    arch: str = _f("cnn", "encoder: cnn (3 conv-BN stages) or tutorial (the tutorial's 2-conv net)",
                   ["cnn", "tutorial"])
    width: int = _f(32, "channels of the first conv stage (cnn: width, 2x, 4x)")
    embed_dim: int = _f(128, "encoder output size (the embedding that is evaluated)")
    proj_hidden: int = _f(256, "projection head hidden size")
    proj_dim: int = _f(64, "projection head output size (what the loss sees)")
    proj_bn: bool = _f(True, "BatchNorm in the projection head (--no-proj-bn with --arch tutorial: a BN-free net)")
    # optimisation
    epochs: int = _f(1, "passes over the training set")
    max_steps: int = _f(0, "stop after this many steps in all (0: no limit)")
    batch_size: int = _f(128, "pairs per step (each step sees 2 x batch_size augmented images)")
    lr: float = _f(3e-3, "peak AdamW learning rate (after warm-up, then cosine decay to 0)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    warmup_steps: int = _f(20, "linear learning-rate warm-up steps")
    temperature: float = _f(0.2, "NT-Xent temperature")
    loss_impl: str = _f("reference", "NT-Xent implementation (fastclr.loss): reference, compiled (torch.compile), "
                                     "tiled (O(N) memory), triton (fused GPU kernels, O(N) memory), auto (the "
                                     "fastest for the shape: measured once on CUDA, a size rule on the CPU)",
                        ["reference", "compiled", "tiled", "triton", "auto"])
    # augmentation (see fastclr.augment.SimCLRAugment)
    crop_min: float = _f(0.6, "RandomResizedCrop minimum area fraction (1.0 switches the crop off)")
    degrees: float = _f(15.0, "rotation range, +-degrees")
    translate: float = _f(0.1, "translation range, fraction of the image size")
    shear: float = _f(10.0, "shear range, +-degrees")
    erase_p: float = _f(0.0, "random-erasing probability")
    hflip_p: float = _f(0.0, "horizontal-flip probability (clothing is left-right symmetric; digits are not)")
    brightness: float = _f(0.0, "per-sample brightness shift range, +- (0: off)")
    contrast: float = _f(0.0, "per-sample contrast factor range, 1 +- contrast (0: off)")
    jitter_p: float = _f(0.8, "probability of the brightness/contrast jitter per sample")
    blur_p: float = _f(0.0, "Gaussian-blur probability (3x3, sigma 0.1-1 per sample)")
    thickness_p: float = _f(0.5, "probability of a random stroke-thickness change (dilate or erode)")
    elastic_p: float = _f(0.8, "probability of an elastic deformation")
    aug: bool = _f(True, "augment at all (--no-aug: both views are the plain image; for tests and ablations)")
    aug_impl: str = _f("fused", "fused: crop + affine + elastic as one grid_sample; kornia: Kornia's modules one after "
                                "another (the reference); both draw crop and affine parameters from Kornia",
                       ["fused", "kornia"])
    # runtime (decided in fastclr.backend)
    device: str = _f("auto", "auto: cuda when present, else cpu", ["auto", "cpu", "cuda"])
    amp: bool = _f(True, "mixed precision (autocast): bf16, or fp16 + GradScaler, on CUDA; bf16 on CPUs with native "
                         "bf16 instructions, fp32 on other CPUs (fastclr.backend decides; --no-amp: fp32 everywhere)")
    compile: bool = _f(False, "torch.compile the model")
    cuda_graph: bool = _f(False, "capture the training step as a CUDA graph and replay it (CUDA, one process, "
                                 "bf16 or fp32; fastclr.capture): one launch per step instead of hundreds")
    channels_last: bool = _f(True, "channels_last memory format for the convolutions (faster with oneDNN/cuDNN)")
    seed: int = _f(0, "random seed (model init, permutation, augmentation); CPU runs are bit-reproducible")
    deterministic: bool = _f(False, "PyTorch's deterministic algorithms (for reproducible CUDA runs; slower)")
    # evaluation
    knn_k: int = _f(20, "neighbours in the k-NN vote")
    knn_temperature: float = _f(0.07, "k-NN vote weight exp(sim / T)")
    knn_backend: typing.Optional[str] = _f(None, "auto, cuml, torch or sklearn (env FASTCLR_KNN_BACKEND)")
    tsne_backend: typing.Optional[str] = _f(None, "auto, cuml or sklearn (env FASTCLR_TSNE_BACKEND)")
    probe_backend: typing.Optional[str] = _f(None, "auto, torch or sklearn (env FASTCLR_PROBE_BACKEND)")
    tsne_points: int = _f(2000, "test points in tsne.png (0: no plot)")
    pixel_knn: bool = _f(True, "also report k-NN on raw pixels under the same protocol")
    linear_probe: bool = _f(True, "also report linear-probe accuracy")
    eval: bool = _f(True, "evaluate after training")
    target_knn: float = _f(0.0, "stop as soon as k-NN test accuracy reaches this (0: train all epochs); "
                                "checked every --eval-every steps and at each epoch's end")
    eval_every: int = _f(0, "steps between k-NN checks for --target-knn (0: at each epoch's end only)")
    # output
    out: typing.Optional[str] = _f(None, "run folder (default: runs/<timestamp>)")
    overwrite: bool = _f(False, "allow --out to hold an earlier, different run")
    resume: bool = _f(False, "continue the run in --out from its checkpoint")
    checkpoint_every: int = _f(0, "steps between extra mid-epoch checkpoints (0: at each epoch's end only)")
    log_every: int = _f(10, "steps between progress-bar updates (each costs one host sync)")

    def validate(self) -> None:
        """Raise FastclrError for settings that cannot work (the CLI prints it as one line)."""
        for name, lo in (("epochs", 1), ("batch_size", 2), ("width", 1), ("embed_dim", 1), ("knn_k", 1),
                         ("log_every", 1)):
            if getattr(self, name) < lo:
                raise FastclrError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        for name in ("temperature", "lr", "knn_temperature"):
            if not getattr(self, name) > 0:
                raise FastclrError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.target_knn <= 1:
            raise FastclrError(f"--target-knn must be in [0, 1], got {self.target_knn}")
        if not 0 < self.crop_min <= 1:
            raise FastclrError(f"--crop-min must be in (0, 1], got {self.crop_min}")
        for name in ("erase_p", "hflip_p", "brightness", "contrast", "jitter_p", "blur_p", "thickness_p",
                     "elastic_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise FastclrError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise FastclrError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)!r} is unknown; "
                                   f"choose one of: {', '.join(choices)}")


def _arg_type(tp):
    tp = typing.get_type_hints(TrainConfig)[tp] if isinstance(tp, str) else tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def build_parser(prog: str = "python -m fastclr.train", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _arg_type(f.name)
        if tp is bool:
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            # choices are checked by TrainConfig.validate, so the error reads the same from Python and CLI
            p.add_argument(flag, type=tp, default=f.default, help=f.metadata["help"]
                           + (f" {{{', '.join(f.metadata['choices'])}}}" if f.metadata.get("choices") else ""))
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Every field from ``ns`` as parsed (no recipe applied: see :func:`resolve_config`)."""
    return TrainConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig)})


_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The fields set on the command line ``argv`` (argparse leaves a pre-set attribute alone when its flag is
    absent, so a sentinel marks the ones not given)."""
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    ns = parser.parse_args(argv, namespace=probe)
    return {k: v for k, v in vars(ns).items() if v is not _UNSET}


def resolve_config(given: dict, default_recipe: str | None = None) -> TrainConfig:
    """TrainConfig from the fields ``given`` on the command line over their recipe: ``given["recipe"]``, else
    ``default_recipe``, else the dataset's own (``fastclr.recipes.default_recipe``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in given.items() if k in names}
    name = given.get("recipe") or default_recipe or recipes.default_recipe(given.get("dataset", "mnist"))
    try:
        settings = recipes.recipe_settings(name)
    except ValueError as exc:
        raise FastclrError(f"--recipe: {exc}") from None
    return TrainConfig(**{**settings, **given})
