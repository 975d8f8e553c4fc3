"""Settings declared once: every field carries its help and resume rule, the CLIs are built from the fields,
recipes apply from Python, the flat saved form round-trips, and a resume is checked through the metadata."""
import dataclasses
import json

import pytest

from fastclr.checkpoint import check_resume
from fastclr.config import (FIXED, FREE, AugConfig, TrainConfig, build_parser, given_flags, leaf_fields,
                            resolve_config, setting)
from fastclr.errors import FastclrError
from fastclr.recipes import RECIPES


def undeclared(cls) -> list[str]:
    """The settings of ``cls`` whose field lacks a resume rule or a help string."""
    return [f.name for f in leaf_fields(cls)
            if f.metadata.get("resume") not in (FIXED, FREE) or not f.metadata.get("help")]


def test_every_setting_declares_help_and_its_resume_rule():
    assert undeclared(TrainConfig) == []


def test_a_setting_without_a_resume_rule_is_caught():
    Bare = dataclasses.make_dataclass("Bare", [("knob", float, dataclasses.field(default=1.0))], bases=(TrainConfig,))
    assert undeclared(Bare) == ["knob"]
    with pytest.raises(ValueError, match="resume must be FIXED or FREE"):
        setting(1.0, "a knob", resume="maybe")


def with_new_setting(rule):
    return dataclasses.make_dataclass("Plus", [("new_knob", float, setting(1.0, "a new setting", rule))],
                                      bases=(TrainConfig,))


def test_resume_refuses_a_change_to_a_new_fixed_setting_and_allows_a_free_one():
    Plus = with_new_setting(FIXED)
    saved = Plus(new_knob=1.0).to_dict()
    check_resume(saved, Plus(new_knob=1.0))
    with pytest.raises(FastclrError, match=r"--new-knob 1\.0 \(now 2\.0\)"):
        check_resume(saved, Plus(new_knob=2.0))
    Free = with_new_setting(FREE)
    check_resume(Free(new_knob=1.0).to_dict(), Free(new_knob=2.0))
    # a file written before the setting existed ran with its default
    check_resume({k: v for k, v in saved.items() if k != "new_knob"}, Plus(new_knob=1.0))
    with pytest.raises(FastclrError, match="--new-knob"):
        check_resume({k: v for k, v in saved.items() if k != "new_knob"}, Plus(new_knob=3.0))


def test_resume_checks_augmentation_settings_and_ignores_output_ones():
    saved = TrainConfig().to_dict()
    with pytest.raises(FastclrError, match="--hflip-p"):
        check_resume(saved, TrainConfig(augment=AugConfig(hflip_p=0.5)))
    with pytest.raises(FastclrError, match="--crop-ratio"):
        check_resume(saved, TrainConfig(augment=AugConfig(crop_ratio=(0.5, 2.0))))
    check_resume(saved, TrainConfig(log_every=3, tsne_points=0, out="elsewhere", loss_impl="tiled"))


def test_every_setting_has_a_flag_with_the_fields_help():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in leaf_fields():
        assert f.name in by_dest, f.name
        assert by_dest[f.name].help.startswith(f.metadata["help"]), f.name


def test_flags_parse_into_the_config_and_pairs_take_two_numbers():
    cfg = resolve_config(given_flags(build_parser(), ["--batch-size", "64", "--no-amp", "--no-pixel-knn",
                                                      "--loss-impl", "tiled", "--crop-ratio", "0.5", "2",
                                                      "--hflip-p", "0.25"]))
    assert (cfg.batch_size, cfg.amp, cfg.pixel_knn, cfg.loss_impl) == (64, False, False, "tiled")
    assert cfg.augment.crop_ratio == (0.5, 2.0) and cfg.augment.hflip_p == 0.25
    assert resolve_config(given_flags(build_parser(), [])) == TrainConfig.from_recipe("mnist")


def test_from_recipe_applies_the_recipe_in_python_and_records_its_name():
    cfg = TrainConfig.from_recipe("fashion-mnist", epochs=2)
    flat = cfg.to_dict()
    assert cfg.recipe == "fashion-mnist" and cfg.epochs == 2
    for key, value in RECIPES["fashion-mnist"].settings.items():
        if key != "epochs":
            assert flat[key] == value, key
    assert TrainConfig.from_recipe(dataset="fashion-mnist").recipe == "fashion-mnist"
    # a plain TrainConfig applies no recipe, and says so
    assert TrainConfig(dataset="fashion-mnist").recipe is None
    with pytest.raises(FastclrError, match="unknown recipe"):
        TrainConfig.from_recipe("imagenet")
    with pytest.raises(FastclrError, match="unknown setting"):
        TrainConfig.from_recipe("mnist", colour=True)


def test_the_flat_form_round_trips_through_json():
    cfg = TrainConfig.from_recipe("fashion-mnist-best", out="x")
    flat = json.loads(json.dumps(cfg.to_dict()))                     # tuples come back as lists
    assert TrainConfig.from_dict(flat) == cfg
    assert set(flat) == {f.name for f in leaf_fields()}


@pytest.mark.parametrize("flat, message", [
    (dict(batch_size=1), "--batch-size must be >= 2, got 1"),
    (dict(temperature=0.0), "--temperature must be > 0, got 0.0"),
    (dict(crop_min=0.0), r"--crop-min must be in \(0, 1\]"),
    (dict(hflip_p=1.5), r"--hflip-p must be in \[0, 1\]"),
    (dict(zoom=(1.1, 0.9)), "--zoom must be a \\(min, max\\) pair"),
    (dict(loader="pil"), "--loader 'pil' is unknown; choose one of: device, torchvision"),
])
def test_validate_reads_bounds_and_choices_from_the_fields(flat, message):
    with pytest.raises(FastclrError, match=message):
        TrainConfig.from_dict(flat).validate()


def test_eval_flags_come_from_the_same_fields_and_default_to_the_checkpoint():
    from fastclr.eval import EVAL_SETTINGS, build_parser as eval_parser, eval_config

    parser = eval_parser()
    by_dest = {a.dest: a for a in parser._actions}
    helps = {f.name: f.metadata["help"] for f in leaf_fields()}
    for name in EVAL_SETTINGS:
        assert by_dest[name].help.startswith(helps[name]), name
    saved = TrainConfig(knn_k=7, pixel_knn=False, tsne_points=10).to_dict()
    cfg = eval_config(parser.parse_args(["--checkpoint", "c.pt"]), saved)
    assert (cfg.knn_k, cfg.pixel_knn, cfg.tsne_points) == (7, False, 10)
    cfg = eval_config(parser.parse_args(["--checkpoint", "c.pt", "--pixel-knn", "--knn-k", "3"]), saved)
    assert (cfg.knn_k, cfg.pixel_knn) == (3, True)
