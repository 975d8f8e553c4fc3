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
