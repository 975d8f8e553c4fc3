"""Every setting of a run, declared once: default, help, choices, bounds and resume rule on its field.

Two plain dataclasses. :class:`AugConfig` is the distribution of random views: it travels whole to the
three pipelines that draw them (the fused warp, Kornia's reference chain, the torchvision transforms).
:class:`TrainConfig` holds everything else, flat, with the augmentation as its ``augment`` field.

Why flat, with one nested group, rather than a tree of groups (data, model, optimisation, ...): flags,
recipes, ``metrics.json`` and the checkpoints of every earlier fastclr name settings by one flat, unique
name (``--hflip-p``, ``hflip_p``), and every other group is read field by field by the one function that
uses it. The augmentation is the only group handed on whole, so it is the only one with its own type.

Each field's metadata (:func:`setting`) says:

* ``help`` and ``choices``: the CLI is generated from them (``batch_size`` -> ``--batch-size``; booleans get
  ``--x/--no-x``; pairs take two numbers), for ``fastclr.train``, ``fastclr.speedrun`` and ``fastclr.eval``;
* ``lo`` / ``hi`` (``lo_open``): the bounds :meth:`TrainConfig.validate` checks;
* ``resume``: ``FIXED`` (a resumed run must keep the saved value: it changes what the run computes) or
  ``FREE`` (logging, evaluation, output). ``fastclr.checkpoint`` checks a resume against it;
  ``tests/test_config.py`` fails for a field without it.

Settings resolve as defaults < recipe (``fastclr.recipes``) < flags: :meth:`TrainConfig.from_recipe`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from . import recipes
from .errors import FastclrError

FIXED, FREE = "fixed", "free"     # may a resumed run change the setting?


def setting(default, help: str, resume: str, choices=None, lo=None, hi=None, lo_open: bool = False,
            aliases: tuple[str, ...] = ()):
    """A dataclass field carrying its CLI help, choices, bounds, resume rule and other flag names (see the module
    docstring)."""
    if resume not in (FIXED, FREE):
        raise ValueError(f"resume must be FIXED or FREE, got {resume!r}")
    meta = dict(help=help, resume=resume, choices=choices, lo=lo, hi=hi, lo_open=lo_open, aliases=aliases)
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def _p(default: float, help: str):
    """A probability (or a [0, 1] range) that changes the views: FIXED on resume."""
    return setting(default, help, FIXED, lo=0.0, hi=1.0)


@dataclass
class AugConfig:
    """The random views: what is drawn, per sample (``fastclr.augment`` says in which order it applies).

    The defaults are the MNIST recipe (docs/recipe.md): a mild crop and a small rotation, stroke thickness
    and an elastic warp; large rotations turn 6 into 9 and flips turn 2 into 5, so neither is on."""

    crop_min: float = setting(0.6, "RandomResizedCrop minimum area fraction (1.0 switches the crop off)", FIXED,
                              lo=0.0, hi=1.0, lo_open=True)
    crop_ratio: tuple = setting((0.75, 1.333), "RandomResizedCrop aspect-ratio range (width / height)", FIXED,
                                lo=0.0, lo_open=True)
    degrees: float = setting(15.0, "rotation range, +-degrees", FIXED, lo=0.0, hi=180.0)
    translate: float = setting(0.1, "translation range, fraction of the image size", FIXED, lo=0.0, hi=1.0)
    zoom: tuple = setting((0.9, 1.1), "the affine's isotropic scale range", FIXED, lo=0.0, lo_open=True)
    shear: float = setting(10.0, "shear range, +-degrees", FIXED, lo=0.0, hi=89.0)
    hflip_p: float = _p(0.0, "horizontal-flip probability (clothing is left-right symmetric; digits are not)")
    thickness_p: float = _p(0.5, "probability of a random stroke-thickness change (3x3 dilate or erode)")
    elastic_p: float = _p(0.8, "probability of an elastic deformation")
    elastic_alpha: float = setting(0.5, "elastic displacement scale, in grid units (Kornia's alpha)", FIXED, lo=0.0)
    elastic_sigma: float = setting(4.0, "elastic field smoothness: Gaussian sigma in pixels", FIXED, lo=0.0,
                                   lo_open=True)
    elastic_kernel: int = setting(15, "elastic field's Gaussian kernel size in pixels (odd)", FIXED, lo=1)
    brightness: float = _p(0.0, "per-sample brightness shift range, +- (0: off)")
    contrast: float = _p(0.0, "per-sample contrast factor range, 1 +- contrast (0: off)")
    jitter_p: float = _p(0.8, "probability of the brightness/contrast jitter per sample")
    color_brightness: float = setting(0.0, "colour jitter: brightness factor U(1 - b, 1 + b), multiplying (torchvision's "
                                           "and Kornia's ColorJitter; 0: off)", FIXED, lo=0.0, hi=1.0)
    color_contrast: float = _p(0.0, "colour jitter: contrast factor U(1 - c, 1 + c), blending with the grey mean (0: off)")
    color_saturation: float = _p(0.0, "colour jitter: saturation factor U(1 - s, 1 + s), blending with the grey image "
                                      "(3 channels only; 0: off)")
    color_hue: float = setting(0.0, "colour jitter: hue shift U(-h, h), in turns of the colour wheel (3 channels only; "
                                    "0: off)", FIXED, lo=0.0, hi=0.5)
    color_p: float = _p(0.8, "probability of the colour jitter per sample (all four factors or none)")
    gray_p: float = _p(0.0, "random-greyscale probability per sample (ITU-R 601 luma in every channel)")
    blur_p: float = _p(0.0, "Gaussian-blur probability (3x3, reflected border)")
    blur_sigma: tuple = setting((0.1, 1.0), "the blur's sigma range, drawn per sample", FIXED, lo=0.0, lo_open=True)
    erase_p: float = _p(0.0, "random-erasing probability (one black rectangle)")
    erase_scale: tuple = setting((0.02, 0.1), "random erasing's area range, fraction of the image", FIXED,
                                 lo=0.0, hi=1.0, lo_open=True)

    @property
    def crop_scale(self) -> tuple[float, float] | None:
        """The crop's area range, ``None`` when the crop is off."""
        return None if self.crop_min >= 1 else (self.crop_min, 1.0)

    @property
    def has_affine(self) -> bool:
        return bool(self.degrees or self.translate or self.shear or tuple(self.zoom) != (1.0, 1.0))

    @property
    def has_jitter(self) -> bool:
        return (self.brightness > 0 or self.contrast > 0) and self.jitter_p > 0

    @property
    def color_factors(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue): the colour jitter's strengths, in the order they apply."""
        return (self.color_brightness, self.color_contrast, self.color_saturation, self.color_hue)

    @property
    def has_color_jitter(self) -> bool:
        return any(self.color_factors) and self.color_p > 0

    @property
    def needs_rgb(self) -> bool:
        """Saturation and hue are undefined on one channel: fastclr refuses them there (train.load_data)."""
        return self.has_color_jitter and bool(self.color_saturation or self.color_hue)

    def scaled_to(self, size: tuple[int, int]) -> "AugConfig":
        """The settings for images of ``size`` (H, W): the elastic field's sigma and kernel are pixel sizes tuned
        at 28 px, so they scale by min(H, W) / 28 (its alpha is already relative to the image). The crop, affine
        and erasing ranges are fractions of the image; the blur (3 x 3) and the stroke-thickness filter (one
        pixel of dilation or erosion) stay as they are: both were chosen on 28 px strokes, and a wider filter
        at larger sizes is a different augmentation that no recipe has measured yet."""
        s = min(size) / 28
        if s == 1:
            return self
        kernel = max(3, int(round(self.elastic_kernel * s)) | 1)
        return dataclasses.replace(self, elastic_sigma=self.elastic_sigma * s, elastic_kernel=kernel)


@dataclass
class TrainConfig:
    """A whole run: data, the view pipeline, network, optimisation, runtime, evaluation and output.

    Build it with :meth:`from_recipe` (defaults < recipe < overrides), or directly for the defaults;
    :meth:`to_dict` / :meth:`from_dict` give the flat form that ``metrics.json`` and checkpoints hold."""

    recipe: typing.Optional[str] = setting(None, "named recipe (fastclr.recipes; default: the dataset's own, mnist "
                                                 "or fashion-mnist); flags given with it override its fields", FREE,
                                           choices=list(recipes.RECIPES))
    # data
    dataset: str = setting("mnist", "what to train on: a built-in dataset (mnist, fashion-mnist, kmnist, cifar10, "
                                    "cifar100, svhn, stl10), an image folder (train/ and test/ of class folders, one "
                                    "tree of class folders, or images alone: unlabeled) or an .npz file (MedMNIST's "
                                    "or Keras's keys); fastclr.sources", FIXED, aliases=("--data",))
    data_dir: typing.Optional[str] = setting(None, "root of the built-in datasets, e.g. holding MNIST/raw "
                                                   "(default: $FASTCLR_DATA, else ./data; downloaded when missing)",
                                             FREE)
    image_size: int = setting(0, "resize every image to N x N once, at load, without cropping (0: as stored; "
                                 "needed for images of mixed sizes)", FIXED, lo=0)
    channels: int = setting(0, "1 or 3: convert every image to greyscale or RGB (0: as stored; RGBA and palette "
                               "images become RGB)", FIXED, choices=[0, 1, 3])
    test_fraction: float = setting(0.1, "the share of each class held out for evaluation where a source has no "
                                        "test split (stratified, seeded by --seed)", FIXED, lo=0.0, hi=0.5,
                                   lo_open=True)
    train_subset: int = setting(0, "train on the first N training images only (0: all); for quick tests", FIXED, lo=0)
    # the view pipeline: which code draws the views of ``augment``
    loader: str = setting("device", "device: the whole uint8 dataset on the device, views drawn there in blocks; "
                                    "torchvision: a DataLoader with per-sample torchvision transforms on the CPU",
                          FIXED, choices=["device", "torchvision"])
    workers: int = setting(2, "DataLoader worker processes for --loader torchvision", FREE, lo=0)
    aug: bool = setting(True, "augment at all (--no-aug: both views are the plain image; for tests and ablations)",
                        FIXED)
    aug_impl: str = setting("fused", "--loader device's views: fused (fastclr's own draws on the device, flip + crop "
                                     "+ affine + elastic as one resampling) or kornia (Kornia's modules one after "
                                     "another: the reference)", FIXED, choices=["fused", "kornia"])
    augment: AugConfig = field(default_factory=AugConfig)
    # model
    arch: str = setting("cnn", "encoder: cnn (3 conv-BN stages), resnet18 (the CIFAR ResNet-18: 3x3 stem, no "
                               "max-pool) or tutorial (the tutorial's 2-conv net)", FIXED,
                        choices=["cnn", "resnet18", "tutorial"])
    width: int = setting(32, "the encoder's width: cnn's stages have width, 2x, 4x channels; resnet18's 2x, 4x, 8x, "
                             "16x (32: the standard 64 to 512)", FIXED, lo=1)
    embed_dim: int = setting(128, "encoder output size (the embedding that is evaluated; resnet18's is its pooled "
                                  "16 x width features)", FIXED, lo=1)
    proj_hidden: int = setting(256, "projection head hidden size", FIXED, lo=1)
    proj_dim: int = setting(64, "projection head output size (what the loss sees)", FIXED, lo=1)
    proj_bn: bool = setting(True, "BatchNorm in the projection head (--no-proj-bn with --arch tutorial: a BN-free "
                                  "net)", FIXED)
    # optimisation
    epochs: int = setting(1, "passes over the training set", FIXED, lo=1)
    max_steps: int = setting(0, "stop after this many steps in all (0: no limit)", FIXED, lo=0)
    steps: int = setting(0, "train this many steps whatever the data's size, in as many epochs as they take (0: "
                            "--epochs decides); a recipe's steps give way to --epochs given with it", FIXED, lo=0)
    batch_size: int = setting(128, "pairs per step (each step sees 2 x batch_size augmented images)", FIXED, lo=2)
    lr: float = setting(3e-3, "peak AdamW learning rate (after warm-up, then cosine decay to 0)", FIXED, lo=0.0,
                        lo_open=True)
    weight_decay: float = setting(1e-4, "AdamW weight decay", FIXED, lo=0.0)
    warmup_steps: int = setting(20, "linear learning-rate warm-up steps", FIXED, lo=0)
    temperature: float = setting(0.2, "NT-Xent temperature", FIXED, lo=0.0, lo_open=True)
    loss_impl: str = setting("reference", "NT-Xent implementation (fastclr.loss): reference, compiled "
                                          "(torch.compile), tiled (O(N) memory), triton (fused GPU kernels, O(N) "
                                          "memory), auto (the fastest for the shape: measured once on CUDA, a size "
                                          "rule on the CPU)", FREE,
                             choices=["reference", "compiled", "tiled", "triton", "auto"])
    # runtime (decided in fastclr.backend)
    device: str = setting("auto", "auto: cuda when present, else cpu", FREE, choices=["auto", "cpu", "cuda"])
    amp: bool = setting(True, "mixed precision (autocast): bf16, or fp16 + GradScaler, on CUDA; bf16 on CPUs with "
                              "native bf16 instructions, fp32 on other CPUs (fastclr.backend decides; --no-amp: fp32 "
                              "everywhere)", FREE)
    compile: bool = setting(False, "torch.compile the model", FREE)
    compile_mode: str = setting("default", "torch.compile's mode with --compile: reduce-overhead adds CUDA graphs "
                                           "made by torch.compile (the measured alternative to --cuda-graph)", FREE,
                                choices=["default", "reduce-overhead", "max-autotune"])
    cuda_graph: bool = setting(False, "capture the training step as a CUDA graph and replay it (CUDA, one process, "
                                      "bf16 or fp32; fastclr.capture): one launch per step instead of hundreds", FIXED)
    channels_last: bool = setting(True, "channels_last memory format for the convolutions (faster with "
                                        "oneDNN/cuDNN)", FREE)
    seed: int = setting(0, "random seed (model init, permutation, augmentation); CPU runs are bit-reproducible",
                        FIXED)
    deterministic: bool = setting(False, "PyTorch's deterministic algorithms (for reproducible CUDA runs; slower)",
                                  FREE)
    # evaluation
    knn_k: int = setting(20, "neighbours in the k-NN vote", FREE, lo=1)
    knn_temperature: float = setting(0.07, "k-NN vote weight exp(sim / T)", FREE, lo=0.0, lo_open=True)
    knn_backend: typing.Optional[str] = setting(None, "auto, cuml, torch or sklearn (env FASTCLR_KNN_BACKEND)", FREE)
    tsne_backend: typing.Optional[str] = setting(None, "auto, cuml or sklearn (env FASTCLR_TSNE_BACKEND)", FREE)
    probe_backend: typing.Optional[str] = setting(None, "auto, torch or sklearn (env FASTCLR_PROBE_BACKEND)", FREE)
    tsne_points: int = setting(2000, "test points in tsne.png (0: no plot)", FREE, lo=0)
    pixel_knn: bool = setting(True, "also report k-NN on raw pixels under the same protocol", FREE)
    linear_probe: bool = setting(True, "also report linear-probe accuracy", FREE)
    eval: bool = setting(True, "evaluate after training", FREE)
    target_knn: float = setting(0.0, "stop as soon as k-NN test accuracy reaches this (0: train all epochs); "
                                     "checked every --eval-every steps and at each epoch's end", FREE, lo=0.0, hi=1.0)
    eval_every: int = setting(0, "steps between k-NN checks for --target-knn (0: at each epoch's end only)", FREE,
                              lo=0)
    # output
    out: typing.Optional[str] = setting(None, "run folder (default: runs/<timestamp>)", FREE)
    overwrite: bool = setting(False, "allow --out to hold an earlier, different run", FREE)
    resume: bool = setting(False, "continue the run in --out from its checkpoint", FREE)
    checkpoint_every: int = setting(0, "steps between extra mid-epoch checkpoints (0: at each epoch's end only)",
                                    FREE, lo=0)
    log_every: int = setting(10, "steps between progress-bar updates (each costs one host sync)", FREE, lo=1)

    @classmethod
    def from_recipe(cls, name: str | None = None, **overrides) -> "TrainConfig":
        """Recipe ``name`` (default: the dataset's own, ``overrides.get("dataset", "mnist")``, or the custom one for
        its channels) under the flat ``overrides``; the config records the recipe's name. FastclrError for an
        unknown recipe or field."""
        if not name:
            from .sources import peek_channels

            dataset = overrides.get("dataset", "mnist")
            name = recipes.default_recipe(dataset, peek_channels(dataset, overrides.get("channels") or 0))
        try:
            settings = recipes.recipe_settings(name)
        except ValueError as exc:
            raise FastclrError(f"--recipe: {exc}") from None
        if "epochs" in overrides and "steps" not in overrides:
            settings.pop("steps", None)         # epochs asked for by name win over the recipe's step budget
        return cls.from_dict({**settings, **overrides, "recipe": name})

    @classmethod
    def from_dict(cls, flat: dict, ignore_unknown: bool = False) -> "TrainConfig":
        """A config from flat ``{name: value}`` (``to_dict``'s form); absent names take their defaults, so a
        file written before a setting existed reads as if it ran with the default."""
        aug_names = {f.name for f in dataclasses.fields(AugConfig)}
        top_names = {f.name for f in dataclasses.fields(cls)} - {"augment"}
        unknown = set(flat) - aug_names - top_names
        if unknown and not ignore_unknown:
            raise FastclrError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        tuples = {f.name for f in leaf_fields(cls) if isinstance(default_of(f), tuple)}
        fix = lambda k, v: tuple(v) if k in tuples and v is not None else v     # JSON turns tuples into lists
        aug = AugConfig(**{k: fix(k, v) for k, v in flat.items() if k in aug_names})
        return cls(**{k: fix(k, v) for k, v in flat.items() if k in top_names}, augment=aug)

    def to_dict(self) -> dict:
        """Every setting by its flat name (what ``metrics.json`` and the checkpoint save)."""
        return {f.name: getattr(owner, f.name) for owner, f in self._leaves()}

    def _leaves(self):
        for f in dataclasses.fields(self):
            if f.name == "augment":
                yield from ((self.augment, g) for g in dataclasses.fields(self.augment))
            else:
                yield self, f

    def validate(self) -> None:
        """Raise FastclrError for a setting outside its choices or bounds, or a dataset that is neither built in
        nor an existing path (the CLI prints it as one line)."""
        from .sources import BUILT_IN, is_source

        if not is_source(self.dataset):
            raise FastclrError(f"--dataset {self.dataset!r} is unknown: neither a built-in dataset "
                               f"({', '.join(BUILT_IN)}) nor an existing image folder or .npz file")
        for owner, f in self._leaves():
            value = getattr(owner, f.name)
            choices = f.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise FastclrError(f"{_flag(f.name)} {value!r} is unknown; choose one of: "
                                   f"{', '.join(map(str, choices))}")
            for v in (value if isinstance(value, tuple) else (value,)):
                _check_bounds(f, v)
            if isinstance(value, tuple) and not (len(value) == 2 and value[0] <= value[1]):
                raise FastclrError(f"{_flag(f.name)} must be a (min, max) pair with min <= max, got {value}")
        if self.compile_mode != "default" and not self.compile:
            raise FastclrError(f"--compile-mode {self.compile_mode} is torch.compile's mode: add --compile")


def leaf_fields(cls: type | None = None) -> list[dataclasses.Field]:
    """Every setting's field of ``cls`` (default TrainConfig), in CLI order (the augmentation's where it nests)."""
    out = []
    for f in dataclasses.fields(cls or TrainConfig):
        out.extend(dataclasses.fields(AugConfig) if f.name == "augment" else [f])
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_bounds(f: dataclasses.Field, v) -> None:
    lo, hi, lo_open = f.metadata["lo"], f.metadata["hi"], f.metadata["lo_open"]
    if v is None or (lo is None and hi is None):
        return
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and v > hi
    if below or above:
        if hi is None:
            rule = f"{'>' if lo_open else '>='} {lo:g}"
        elif lo is None:
            rule = f"<= {hi:g}"
        else:
            rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise FastclrError(f"{_flag(f.name)} must be {rule}, got {v}")


# --------------------------------------------------------------------------- the CLI, from the fields

def _arg_type(f: dataclasses.Field):
    owner = AugConfig if f.name in AugConfig.__dataclass_fields__ else TrainConfig
    tp = typing.get_type_hints(owner)[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_setting_flags(parser: argparse.ArgumentParser, names=None, defaults: dict | None = None) -> None:
    """One flag per setting (``names``: those only), with the field's help and choices; ``defaults`` replaces the
    fields' defaults (``fastclr.eval``: None, so that the checkpoint's values apply)."""
    for f in leaf_fields():
        if names is not None and f.name not in names:
            continue
        default = defaults[f.name] if defaults is not None and f.name in defaults else default_of(f)
        tp, help = _arg_type(f), f.metadata["help"]
        flags = (_flag(f.name), *f.metadata["aliases"])
        if tp is bool:
            parser.add_argument(*flags, default=default, action=argparse.BooleanOptionalAction, help=help)
        elif tp is tuple:
            parser.add_argument(*flags, type=float, nargs=2, default=default, metavar=("MIN", "MAX"), help=help)
        else:
            # choices are checked by TrainConfig.validate, so the error reads the same from Python and CLI
            choices = f.metadata["choices"]
            parser.add_argument(*flags, type=tp, default=default, dest=f.name,
                                help=help + (f" {{{', '.join(map(str, choices))}}}" if choices else ""))


def build_parser(prog: str = "python -m fastclr.train", description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setting_flags(p)
    return p


_UNSET = object()


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The settings given on the command line ``argv``, flat (argparse leaves a pre-set attribute alone when its
    flag is absent, so a sentinel marks the ones not given); pairs come back as tuples."""
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    ns = parser.parse_args(argv, namespace=probe)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(ns).items() if v is not _UNSET}


def resolve_config(given: dict, default_recipe: str | None = None) -> TrainConfig:
    """TrainConfig from the settings ``given`` on the command line over their recipe: ``given["recipe"]``, else
    ``default_recipe``, else the dataset's own (``fastclr.recipes.default_recipe``). Keys that are not settings
    (a CLI's own flags) are left out."""
    names = {f.name for f in leaf_fields()}
    given = {k: v for k, v in given.items() if k in names}
    return TrainConfig.from_recipe(given.pop("recipe", None) or default_recipe, **given)
