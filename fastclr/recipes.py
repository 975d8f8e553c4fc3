"""Named training recipes: every setting a recipe changes from ``TrainConfig``'s defaults, in one table.

``python -m fastclr.train --recipe NAME`` picks one; without ``--recipe`` the dataset's own recipe is used
(``--dataset fashion-mnist`` -> ``fashion-mnist``). Flags given on the command line override the recipe's
fields, and the resolved config (its ``recipe`` field included) is saved with the run. How each recipe was
chosen, with the measurements: docs/recipe.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    summary: str
    settings: dict = field(default_factory=dict)     # TrainConfig field -> value; the rest are the defaults


# clothing has texture and contrast where digits have strokes, and is left-right symmetric: on Fashion-MNIST
# the intensity jitter is most of the gain (docs/recipe.md); stroke thickness and the elastic warp stay
_CLOTHING = dict(hflip_p=0.5, brightness=0.2, contrast=0.3, blur_p=0.5)
# a 512-d embedding: on clothing the 128-d one limits the linear probe most (5 epochs, seed 0: probe
# 0.8703 -> 0.8998, k-NN 0.8691 -> 0.8764), for about 15% more time per step; on MNIST it is within noise
_CLOTHING_NET = dict(embed_dim=512)

# SimCLR's colour distortion at strength s = 0.5 (its CIFAR-10 setting: jitter 0.8 s, 0.8 s, 0.8 s, 0.2 s at p 0.8,
# greyscale at p 0.2)
_COLOR = dict(color_brightness=0.4, color_contrast=0.4, color_saturation=0.4, color_hue=0.1, color_p=0.8, gray_p=0.2)
# SimCLR's CIFAR-10 geometry: a crop of 8% to 100% of the image and a flip, nothing else
_CROP_FLIP = dict(crop_min=0.08, hflip_p=0.5, degrees=0.0, translate=0.0, shear=0.0, zoom=(1.0, 1.0), thickness_p=0.0,
                  elastic_p=0.0)

CUSTOM, CUSTOM_COLOR = "custom", "custom-color"

RECIPES: dict[str, Recipe] = {
    "mnist": Recipe("MNIST, 1 epoch: TrainConfig's defaults (crop, affine, stroke thickness, elastic)"),
    "mnist-best": Recipe("MNIST, the best accuracy on a 2-core CPU: 70 epochs, with brightness/contrast jitter",
                         dict(epochs=70, brightness=0.2, contrast=0.3)),
    "mnist-speedrun": Recipe("MNIST, time to a k-NN target (python -m fastclr.speedrun)",
                             dict(epochs=5, tsne_points=0, pixel_knn=False, linear_probe=False)),
    "mnist-speedrun-gpu": Recipe("MNIST, time to a k-NN target on a CUDA GPU (python -m fastclr.speedrun picks it "
                                 "there): bigger batches, the captured step, frequent k-NN checks. A candidate: "
                                 "not yet timed on a GPU (scripts/gpu_check.sh times it)",
                                 dict(epochs=5, batch_size=512, lr=6e-3, cuda_graph=True, eval_every=20,
                                      tsne_points=0, pixel_knn=False, linear_probe=False)),
    "fashion-mnist": Recipe("Fashion-MNIST, 5 epochs: the MNIST augmentation plus brightness/contrast jitter, "
                            "flips and blur; a 512-d embedding",
                            dict(dataset="fashion-mnist", epochs=5, **_CLOTHING, **_CLOTHING_NET)),
    "fashion-mnist-best": Recipe("Fashion-MNIST, the best accuracy in under 45 minutes on a 2-core CPU",
                                 dict(dataset="fashion-mnist", epochs=40, **_CLOTHING, **_CLOTHING_NET)),
    # a step budget rather than epochs: an unknown source may hold 1,800 images or a million. 5,000 steps was the
    # best of five settings on scikit-learn's 8x8 digits, a hold-out neither MNIST recipe saw (docs/recipe.md)
    CUSTOM: Recipe("any other source (an image folder, an .npz file, a torchvision dataset): the MNIST "
                   "augmentation for 5,000 steps, as many epochs as they take",
                   dict(steps=5000)),
    # the hue over the whole colour wheel (0.5, where SimCLR's CIFAR setting has 0.1): on Fashion-MNIST tinted at
    # random, 5 epochs, k-NN 0.8781 against 0.8517 at hue 0.1 and 0.8608 at SimCLR's strength 1 (docs/recipe.md)
    CUSTOM_COLOR: Recipe("any other colour source: the clothing augmentation with colour jitter (hue over the whole "
                         "wheel) and random greyscale in place of the additive jitter, a 512-d embedding, 5,000 steps",
                         dict(steps=5000, hflip_p=0.5, blur_p=0.5, **{**_COLOR, "color_hue": 0.5}, **_CLOTHING_NET)),
    "cifar10": Recipe("CIFAR-10 on the CIFAR ResNet-18: SimCLR's CIFAR augmentation (crop 0.08-1, flip, colour "
                      "jitter 0.4/0.4/0.4/0.1 at p 0.8, greyscale at p 0.2), batch 512, 200 epochs. Not run on "
                      "CIFAR-10 here (docs/recipe.md)",
                      dict(dataset="cifar10", arch="resnet18", epochs=200, batch_size=512, lr=2e-3,
                           warmup_steps=1000, proj_hidden=2048, proj_dim=128, **_CROP_FLIP, **_COLOR)),
}

# the recipe a dataset gets when --recipe is not given; every other source gets CUSTOM, or CUSTOM_COLOR in colour
DATASET_RECIPE = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}


def recipe_settings(name: str) -> dict:
    """The fields recipe ``name`` sets (a copy); ValueError naming the choices for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return {**RECIPES[name].settings, "recipe": name}


def default_recipe(dataset: str, channels: int = 1) -> str:
    """The recipe a source gets without --recipe: its own, else CUSTOM for one channel, CUSTOM_COLOR for three
    (``fastclr.sources.peek_channels`` tells which)."""
    return DATASET_RECIPE.get(dataset, CUSTOM_COLOR if channels == 3 else CUSTOM)
