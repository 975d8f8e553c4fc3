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
