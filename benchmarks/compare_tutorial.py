"""Side-by-side: the tutorial script as published against fastclr on the tutorial's own network and batch size.

    python -m benchmarks.compare_tutorial --tutorial PATH/tutorial_simclr.py [--data-dir DIR]

The tutorial script is not part of fastclr: pass the path of your copy (it reads MNIST_ROOT and SEED_EPOCHS
from the environment and prints ``train_s``).

Runs both, one after the other, in this one invocation (one epoch each) and prints training throughput
(augmented images through the encoder per second, both views) and the ratio. Takes ~3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def run_tutorial(script: Path, data_dir: Path) -> dict:
    env = {**os.environ, "MNIST_ROOT": str(data_dir.resolve()), "SEED_EPOCHS": "1", "MPLBACKEND": "Agg"}
    with tempfile.TemporaryDirectory() as tmp:   # it writes mnist_embeddings.png into its cwd
        out = subprocess.run([sys.executable, str(script.resolve())], cwd=tmp, env=env, capture_output=True,
                             text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"tutorial failed:\n{out.stderr[-2000:]}")
    train_s = float(re.search(r"train_s ([\d.]+)", out.stdout).group(1))
    loss = re.search(r"Loss: ([\deE+.-]+)", out.stdout).group(1)
    acc = float(re.search(r"k-NN Classification Accuracy: ([\d.]+)", out.stdout).group(1))
    # 60,000 images a epoch, each seen as two views (aug1, aug2) by the encoder
    return {"train_seconds": train_s, "images_per_second": 2 * 60000 / train_s, "printed_loss": loss,
            "own_knn_accuracy_8000_2000_test_split": acc}


def run_fastclr(data_dir: Path, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fastclr.train", "--data-dir", str(data_dir), "--arch", "tutorial",
               "--batch-size", "128", "--epochs", "1", "--out", f"{tmp}/run", "--tsne-points", "0", *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise SystemExit(f"fastclr failed:\n{out.stderr[-2000:]}")
        m = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    return {"train_seconds": m["train_seconds"], "images_per_second": m["train_images_per_second"],
            "final_loss": m["final_loss"], "knn_accuracy": m.get("knn_accuracy"),
            "pixel_knn_accuracy": m.get("pixel_knn_accuracy"), "command": " ".join(cmd[1:])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tutorial", required=True, help="the tutorial script, as published")
    p.add_argument("--data-dir", default=None, help="MNIST root (default: $FASTCLR_DATA, else ./data)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--fastclr-args", default="", help="extra fastclr.train flags, e.g. '--no-amp'")
    args = p.parse_args(argv)
    from fastclr.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    tut = run_tutorial(Path(args.tutorial), data_dir)
    fc = run_fastclr(data_dir, args.fastclr_args.split())
    result = {"tutorial": tut, "fastclr_tutorial_net_batch128": fc,
              "throughput_ratio": fc["images_per_second"] / tut["images_per_second"]}
    print(json.dumps(result, indent=2))
    print(f"fastclr / tutorial training throughput: {result['throughput_ratio']:.2f}x "
          f"({fc['images_per_second']:.0f} vs {tut['images_per_second']:.0f} images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
