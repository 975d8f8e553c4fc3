"""Smoke test: every benchmark module imports and runs each of its cases once, at its smallest size."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_module_runs_once(tmp_path):
    env = {**os.environ, "FASTCLR_BENCH_QUICK": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                        f"--benchmark-storage=file://{tmp_path}", "--benchmark-json", str(tmp_path / "b.json"),
                        "-k", "not compiled"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout.splitlines()[-1]
    # a stage that timed out leaves no file (scripts/gpu_check.sh): the report covers the others
    r2 = subprocess.run([sys.executable, "-m", "benchmarks.report", str(tmp_path / "b.json"),
                         str(tmp_path / "timed-out.json"), "--out", str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (tmp_path / "report" / "throughput.png").stat().st_size > 1000
    md = (tmp_path / "report" / "summary.md").read_text()
    # one group (at least) from each bench_*.py module
    for group in ("loss-cpu-N256", "augment-b512", "epoch-data-cpu", "train_step-cpu", "epoch-cpu", "knn-cpu",
                  "tsne-500", "probe-cpu", "pool_relu-16x28-cpu", "first_block-cpu"):
        assert group in md, group


def test_results_table_gives_mean_and_range_per_setting():
    """benchmarks.results' table from made-up runs: the mean and [min, max] of each figure, every seed listed."""
    from benchmarks.results import table

    runs = [dict(knn_accuracy=k, linear_probe_accuracy=p, pixel_knn_accuracy=0.9712, train_images_per_second=s,
                 final_loss=2.5, config={"seed": i}) for i, (k, p, s) in enumerate([(0.98, 0.985, 3000.0),
                                                                                   (0.982, 0.986, 3100.0),
                                                                                   (0.984, 0.984, 3200.0)])]
    lines = table({"mnist-1": runs}, 3)
    assert "| 0.9820 [0.9800, 0.9840] | 0.9850 [0.9840, 0.9860] | 0.9712 | 3100 [3000, 3200] |" in lines[2]
    assert sum(line.startswith("| mnist-1 |") for line in lines) == 3


def test_runs_table_sets_the_steady_state_beside_the_whole_run(tmp_path):
    """benchmarks.report --runs: one row per metrics.json, the step named (captured, compiled in which mode)."""
    import json

    from benchmarks.report import runs_table

    base = dict(steps=468, train_seconds=2.0, train_images_per_second=59904.0)
    (tmp_path / "graph-b128.json").write_text(json.dumps(dict(
        base, steady_images_per_second=300000.0, steady_state_steps=[20, 468],
        config=dict(batch_size=128, cuda_graph=True, compile=False))))
    (tmp_path / "compile-ro-b128.json").write_text(json.dumps(dict(
        base, steady_images_per_second=None, steady_state_steps=None, knn_accuracy=0.98,
        config=dict(batch_size=128, cuda_graph=False, compile=True, compile_mode="reduce-overhead"))))
    md = runs_table([tmp_path / "graph-b128.json", tmp_path / "compile-ro-b128.json"])
    assert "| graph-b128 | 128 | --cuda-graph | 468 | 2.00 | 59,904 | 300,000 (20-468) | - | - |" in md
    assert "| compile-ro-b128 | 128 | compile reduce-overhead | 468 | 2.00 | 59,904 | - | - | 0.9800 |" in md


def test_lightly_settings_follow_the_recipe_and_name_what_they_cannot_express():
    from benchmarks.compare_lightly import lightly_settings
    from fastclr.config import TrainConfig

    aug = TrainConfig.from_recipe("custom-color").augment
    kwargs, missing = lightly_settings(aug, 32, (0.1, 0.2, 0.3), (0.3, 0.3, 0.3), 3)
    assert (kwargs["cj_bright"], kwargs["cj_contrast"], kwargs["cj_sat"], kwargs["cj_hue"]) == aug.color_factors
    assert (kwargs["cj_prob"], kwargs["random_gray_scale"], kwargs["min_scale"], kwargs["hf_prob"]) == (
        aug.color_p, aug.gray_p, aug.crop_min, aug.hflip_p)
    assert kwargs["cj_strength"] == 1.0 and kwargs["normalize"]["mean"] == [0.1, 0.2, 0.3]
    assert any(m.startswith("elastic_p") for m in missing) and any(m.startswith("thickness_p") for m in missing)
    grey, _ = lightly_settings(TrainConfig.from_recipe("mnist").augment, 28, 0.13, 0.31, 1)
    assert grey["cj_prob"] == 0.0 and grey["rr_degrees"] == 15.0 and grey["normalize"]["std"] == [0.31]


def test_compare_lightly_skips_in_one_line_without_lightly(monkeypatch, capsys):
    from benchmarks import compare_lightly

    monkeypatch.setattr(compare_lightly, "lightly_available", lambda: False)
    assert compare_lightly.main(["--dataset", "mnist"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install --no-deps lightly lightning-utilities" in out[0]
