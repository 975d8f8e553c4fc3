"""Self-supervised MNIST speedrun: ``python -m fastclr.speedrun --target 0.985``.

Trains SimCLR with the speedrun recipe (``mnist-speedrun``; ``mnist-speedrun-gpu`` on a CUDA device) until
k-NN test accuracy (checked at each epoch's end, or every ``--eval-every`` steps) reaches the target, then
prints the time to target measured from the start of the run (data loading, training and the k-NN checks all
count), split into startup, training and k-NN checks. Any other ``fastclr.train`` flag can follow.
"""
from __future__ import annotations

import sys
import time

from .backend import resolve_device
from .errors import FastclrError
from .config import build_parser, given_flags, resolve_config

RECIPE = "mnist-speedrun"            # fastclr.recipes; --recipe picks another
GPU_RECIPE = "mnist-speedrun-gpu"    # where the run goes to a CUDA device
DEFAULT_TARGET = 0.985


def main(argv=None) -> int:
    parser = build_parser(prog="python -m fastclr.speedrun", description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=None,
                        help="k-NN accuracy to reach (default 0.985; --target-knn is the same setting)")
    given = given_flags(parser, argv)
    target = given.pop("target", None)
    if target is not None and given.get("target_knn") and target != given["target_knn"]:
        parser.error(f"--target {target} and --target-knn {given['target_knn']} disagree: give one")
    given["target_knn"] = target if target is not None else (given.get("target_knn") or DEFAULT_TARGET)
    from .train import train

    t0 = time.perf_counter()
    try:
        on_cuda = resolve_device(given.get("device")).type == "cuda"
        cfg = resolve_config(given, default_recipe=GPU_RECIPE if on_cuda else RECIPE)
        metrics = train(cfg)
    except FastclrError as exc:
        print(f"fastclr.speedrun: error: {exc}", file=sys.stderr)
        return 2
    if not metrics:
        return 0
    if metrics["reached_target"]:
        t = metrics["time_to_target_seconds"]
        print(f"speedrun: k-NN {metrics['knn_history'][-1]['knn_accuracy']:.4f} >= {cfg.target_knn} after "
              f"{metrics['steps']} steps; time to target {t:.1f}s from the start = {metrics['startup_seconds']:.1f}s "
              f"startup (data, model) + {t - metrics['startup_seconds']:.1f}s of training "
              f"({metrics['train_seconds']:.1f}s) and k-NN checks ({metrics['knn_check_seconds']:.1f}s); "
              f"{time.perf_counter() - t0:.1f}s for the whole command")
        return 0
    best = max(h["knn_accuracy"] for h in metrics["knn_history"])
    print(f"speedrun: target {cfg.target_knn} NOT reached in {metrics['steps']} steps (best k-NN {best:.4f})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
