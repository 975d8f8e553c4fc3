"""Accuracy over seeds: the README's accuracy rows, as mean and range, written to one results file per machine.

    python -m benchmarks.results --seeds 3 --machine cpu-2core-epyc [--data-dir DIR] [--only mnist-1]

Each setting runs ``python -m fastclr.train`` once per seed (a fresh process, as a user runs it) and reads its
``metrics.json``; ``benchmarks/results/accuracy-MACHINE.md`` gets a table of k-NN, linear probe and raw-pixel
k-NN (mean [min, max]) with every seed's figures, the training throughput, the commit and the date, and
``accuracy-MACHINE.json`` the raw figures. The long recipes (``mnist-best``, ``fashion-mnist-best``: 35-45
minutes a run on 2 cores) are not run here: docs/recipe.md gives their single runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (what the row says, fastclr.train flags)
SETTINGS = {
    "mnist-1": ("MNIST, 1 epoch (the `mnist` recipe)", ["--epochs", "1"]),
    "fashion-mnist-5": ("Fashion-MNIST, 5 epochs (the `fashion-mnist` recipe)", ["--dataset", "fashion-mnist"]),
}
METRICS = ("knn_accuracy", "linear_probe_accuracy", "pixel_knn_accuracy", "train_images_per_second")


def run_one(flags: list[str], seed: int, data_dir: str | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "fastclr.train", *flags, "--seed", str(seed), "--tsne-points", "0",
           "--out", str(out), "--overwrite"] + (["--data-dir", data_dir] if data_dir else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def summary(values: list[float], digits: int = 4) -> str:
    """mean [min, max]"""
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def table(results: dict, seeds: int) -> list[str]:
    lines = ["| setting | command | k-NN | linear probe | raw-pixel k-NN | training images/s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        what, flags = SETTINGS[name]
        col = {m: [r[m] for r in runs] for m in METRICS}
        lines.append(f"| {what} | `python -m fastclr.train {' '.join(flags)} --seed S` | {summary(col['knn_accuracy'])} "
                     f"| {summary(col['linear_probe_accuracy'])} | {statistics.mean(col['pixel_knn_accuracy']):.4f} "
                     f"| {summary(col['train_images_per_second'], 0)} |")
    lines += ["", f"Mean [min, max] over seeds 0-{seeds - 1}. Every seed:", "",
              "| setting | seed | k-NN | linear probe | final loss |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        for r in runs:
            lines.append(f"| {name} | {r['config']['seed']} | {r['knn_accuracy']:.4f} | "
                         f"{r['linear_probe_accuracy']:.4f} | {r['final_loss']:.4f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per setting")
    p.add_argument("--machine", required=True, help="names the file: benchmarks/results/accuracy-MACHINE.md")
    p.add_argument("--data-dir", default=None, help="passed to fastclr.train")
    p.add_argument("--only", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    args = p.parse_args(argv)
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            results[name] = []
            for seed in range(args.seeds):
                m = run_one(SETTINGS[name][1], seed, args.data_dir, Path(tmp) / f"{name}-{seed}")
                results[name].append({k: m.get(k) for k in (*METRICS, "final_loss", "config", "git_commit")})
                print(f"{name} seed {seed}: k-NN {m['knn_accuracy']:.4f}, probe {m['linear_probe_accuracy']:.4f}",
                      flush=True)
    commits = {r["git_commit"] for runs in results.values() for r in runs}
    head = [f"# fastclr accuracy over seeds: {args.machine}", "",
            f"`python -m benchmarks.results --seeds {args.seeds} --machine {args.machine}`, run "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))} at commit "
            f"{', '.join(c[:10] if c else '?' for c in sorted(commits, key=str))}, {time.time() - t0:.0f} s in all "
            "(each run a fresh `python -m fastclr.train` process, t-SNE off).", ""]
    RESULTS.mkdir(exist_ok=True)
    md = RESULTS / f"accuracy-{args.machine}.md"
    md.write_text("\n".join(head + table(results, args.seeds)) + "\n")
    (RESULTS / f"accuracy-{args.machine}.json").write_text(json.dumps(results, indent=1))
    print(md.read_text())


if __name__ == "__main__":
    main()
