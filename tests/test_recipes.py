import pytest

from fastclr.errors import FastclrError
from fastclr.config import TrainConfig, build_parser, given_flags, leaf_fields, resolve_config
from fastclr.recipes import DATASET_RECIPE, RECIPES


def resolve(argv, **kw):
    return resolve_config(given_flags(build_parser(), argv), **kw)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_names_real_fields_and_validates(name):
    fields = {f.name for f in leaf_fields()}
    assert set(RECIPES[name].settings) <= fields
    cfg = resolve(["--recipe", name])
    cfg.validate()
    assert cfg.recipe == name
    for key, value in RECIPES[name].settings.items():
        assert cfg.to_dict()[key] == value


def test_no_flags_give_the_mnist_recipe_which_is_the_dataclass_defaults():
    assert resolve([]) == TrainConfig(recipe="mnist")
    assert RECIPES["mnist"].settings == {}


def test_the_dataset_picks_its_own_recipe():
    cfg = resolve(["--dataset", "fashion-mnist"])
    assert cfg.recipe == "fashion-mnist" == DATASET_RECIPE["fashion-mnist"]
    assert cfg.augment.hflip_p == RECIPES["fashion-mnist"].settings["hflip_p"] > 0
    assert resolve(["--dataset", "mnist"]).recipe == "mnist"


def test_flags_override_the_recipe_even_when_they_equal_the_dataclass_default():
    cfg = resolve(["--recipe", "fashion-mnist", "--epochs", "1", "--thickness-p", "0.5", "--hflip-p", "0"])
    assert (cfg.epochs, cfg.augment.thickness_p, cfg.augment.hflip_p) == (1, 0.5, 0.0)
    assert cfg.dataset == "fashion-mnist"
    # a recipe on the other dataset: the flag wins, the rest of the recipe stays
    cfg = resolve(["--recipe", "fashion-mnist", "--dataset", "mnist"])
    assert cfg.dataset == "mnist" and cfg.augment.hflip_p == RECIPES["fashion-mnist"].settings["hflip_p"]


def test_boolean_flags_count_as_given():
    cfg = resolve(["--recipe", "mnist-speedrun", "--pixel-knn"])
    assert cfg.pixel_knn and not cfg.linear_probe


def test_a_callers_default_recipe_yields_to_an_explicit_one():
    assert resolve([], default_recipe="mnist-speedrun").recipe == "mnist-speedrun"
    assert resolve(["--recipe", "mnist"], default_recipe="mnist-speedrun").recipe == "mnist"


def test_unknown_recipe_is_one_clear_error():
    with pytest.raises(FastclrError, match="unknown recipe 'imagenet'.*fashion-mnist"):
        resolve(["--recipe", "imagenet"])


@pytest.mark.parametrize("flag", ["--hflip-p", "--brightness", "--contrast", "--blur-p", "--jitter-p"])
def test_new_augmentation_flags_are_probabilities_or_ranges_in_zero_one(flag):
    with pytest.raises(FastclrError, match=flag):
        resolve([flag, "1.5"]).validate()


def test_any_other_source_gets_the_custom_recipe_whose_step_budget_gives_way_to_epochs(tmp_path):
    from fastclr.recipes import CUSTOM

    (tmp_path / "d.npz").write_bytes(b"")
    cfg = resolve(["--data", str(tmp_path / "d.npz")])
    assert cfg.recipe == CUSTOM and cfg.steps == RECIPES[CUSTOM].settings["steps"] > 0
    cfg = resolve(["--data", str(tmp_path / "d.npz"), "--epochs", "3"])
    assert (cfg.recipe, cfg.steps, cfg.epochs) == (CUSTOM, 0, 3)


def test_a_step_budget_sets_the_epochs_it_takes():
    from fastclr.train import epochs_planned, total_steps

    cfg = TrainConfig(steps=1000)
    assert (total_steps(cfg, 300), epochs_planned(cfg, 300)) == (1000, 4)
    assert total_steps(TrainConfig(steps=1000, max_steps=250), 300) == 250
    assert (total_steps(TrainConfig(epochs=2), 300), epochs_planned(TrainConfig(epochs=2), 300)) == (600, 2)


def test_a_colour_source_gets_the_colour_recipe_and_cifar10_its_own(tmp_path):
    import numpy as np

    from fastclr.recipes import CUSTOM, CUSTOM_COLOR

    np.savez(tmp_path / "rgb.npz", x_train=np.zeros((4, 8, 8, 3), np.uint8))
    cfg = resolve(["--data", str(tmp_path / "rgb.npz")])
    assert cfg.recipe == CUSTOM_COLOR and cfg.augment.has_color_jitter and cfg.augment.gray_p == 0.2
    assert resolve(["--data", str(tmp_path / "rgb.npz"), "--channels", "1"]).recipe == CUSTOM
    cifar = resolve(["--dataset", "cifar10"])
    assert (cifar.recipe, cifar.arch) == ("cifar10", "resnet18")
    assert cifar.augment.color_factors == (0.4, 0.4, 0.4, 0.1) and cifar.augment.crop_min == 0.08
    assert not (cifar.augment.has_affine or cifar.augment.elastic_p or cifar.augment.thickness_p)
