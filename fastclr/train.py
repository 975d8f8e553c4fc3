"""SimCLR training: ``python -m fastclr.train [--amp] ...`` trains, checkpoints, evaluates and writes a run folder.

Run folder (``--out``, default ``runs/<timestamp>``): ``checkpoint.pt``, ``metrics.json``, ``loss.png``,
``tsne.png``. Under ``torchrun`` every rank trains its shard of each epoch and only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import backend
from .augment import SimCLRAugment
from .backend import FastclrError
from .capture import CapturedStep
from .checkpoint import (CHECKPOINT_FORMAT, TrainState, read_checkpoint, rng_state, set_rng_state,
                         write_checkpoint)
from .config import TrainConfig, build_parser, given_flags, resolve_config
from .data import DevicePairs, PairSource, TorchvisionPairs, dataset_info, load_dataset, torchvision_transform
from .eval import evaluate
from .loss import NTXentLoss
from .model import build_model

# Dataset pixel statistics, baked into the encoder so a loaded encoder takes raw [0, 1] images.
NORM = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}


# --------------------------------------------------------------------------- distributed context

@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(runtime: backend.Runtime) -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


# --------------------------------------------------------------------------- run folder, seeds, checkpoints

def prepare_out_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = out / "checkpoint.pt"
    if cfg.resume:
        if not ckpt.is_file():
            raise FastclrError(f"--resume: no checkpoint at {ckpt}; start without --resume")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FastclrError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- the step

def views_loss(model, loss_fn, v1, v2, runtime: backend.Runtime, channels_last: bool = False) -> torch.Tensor:
    """NT-Xent of a (B, 1, 28, 28) view pair through ``model``, under the runtime's autocast; a () tensor.

    Both views go through the network as one 2B batch: one kernel launch per layer instead of two."""
    x = torch.cat([v1, v2])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        z = model(x)
    return loss_fn(*z.float().chunk(2))


def train_step(model, loss_fn, optimizer, scaler, scheduler, v1, v2, runtime: backend.Runtime,
               channels_last: bool = False) -> torch.Tensor:
    """One SimCLR step on a (B, 1, 28, 28) view pair; returns the loss as a device tensor (no host sync)."""
    loss = views_loss(model, loss_fn, v1, v2, runtime, channels_last)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


@dataclasses.dataclass
class Training:
    """What a training step needs, assembled from the config in one place (``train`` and the benchmarks)."""

    model: torch.nn.Module        # SimCLRModel: the weights that are saved and evaluated
    net: torch.nn.Module          # what the step calls: ``model``, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: NTXentLoss
    runtime: backend.Runtime
    channels_last: bool
    captured: CapturedStep | None = None     # --cuda-graph: the step as a replayed CUDA graph

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """One step on a (B, 1, 28, 28) view pair; the loss as a device tensor."""
        if self.captured is not None:
            return self.captured(v1, v2)
        return train_step(self.net, self.loss_fn, self.optimizer, self.scaler, self.scheduler, v1, v2,
                          self.runtime, self.channels_last)

    def views_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """The loss of a view pair through ``net``, without a step (the captured step's forward)."""
        return views_loss(self.net, self.loss_fn, v1, v2, self.runtime, self.channels_last)


def build_training(cfg: TrainConfig, runtime: backend.Runtime, total_steps: int, world_size: int = 1,
                   state: dict | None = None) -> Training:
    """Model, optimiser (AdamW, fused where available), schedule, scaler and loss as ``cfg`` says; ``state``
    (a checkpoint) is loaded before compiling and DDP-wrapping."""
    mean, std = NORM[cfg.dataset]
    model = build_model(cfg.arch, cfg.width, cfg.embed_dim, cfg.proj_hidden, cfg.proj_dim, mean, std, cfg.proj_bn)
    if world_size > 1 and runtime.device.type == "cuda":
        # BN statistics over the global batch. PyTorch's SyncBatchNorm runs on GPUs only: CPU (gloo) ranks
        # keep per-rank BN statistics (see README, "Multi-GPU").
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device)
    model.encoder.cpu_kernels = runtime.cpu_kernels
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = runtime.optimizer(model.parameters(), cfg.lr, cfg.weight_decay, capturable=cfg.cuda_graph)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    if state is not None:
        model.encoder.load_state_dict(state["encoder"])
        model.head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])   # --cuda-graph: CapturedStep sets the lr tensor again
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    net = torch.compile(model) if runtime.compile else model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    loss_fn = NTXentLoss(cfg.temperature, cfg.loss_impl, gather_distributed=world_size > 1, check_finite=False)
    return Training(model, net, optimizer, scheduler, scaler, loss_fn, runtime, cfg.channels_last)


def check_cuda_graph(cfg: TrainConfig, runtime: backend.Runtime, world_size: int) -> None:
    """--cuda-graph's requirements, as one clear error each."""
    if not cfg.cuda_graph:
        return
    if runtime.device.type != "cuda":
        raise FastclrError("--cuda-graph needs a CUDA device (this run is on the CPU); drop the flag")
    if world_size > 1 or cfg.compile or runtime.needs_grad_scaler or cfg.loader != "device":
        raise FastclrError("--cuda-graph runs one process with --loader device, without --compile and without fp16 "
                           "(bf16 or --no-amp): " + ", ".join(
                               n for n, bad in (("several processes", world_size > 1), ("--compile", cfg.compile),
                                                ("fp16 autocast", runtime.needs_grad_scaler),
                                                (f"--loader {cfg.loader}", cfg.loader != "device")) if bad))


class StopRequested:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step: finish the step, save, exit."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def plot_loss(losses: list[float], path: Path, steps_per_epoch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, label="NT-Xent (per step)")
    if len(losses) >= 20:
        w = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(losses) + 1), smooth, lw=2, label=f"mean of {w}")
    for e in range(steps_per_epoch, len(losses), steps_per_epoch):
        ax.axvline(e, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("SimCLR training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the run

def make_pairs(cfg: TrainConfig, images: torch.Tensor, runtime: backend.Runtime, d: Dist) -> PairSource:
    """The configured view-pair source: device-resident + Kornia (default) or DataLoader + torchvision v2."""
    crop = None if cfg.crop_min >= 1 else (cfg.crop_min, 1.0)
    if cfg.loader == "device":
        augment = SimCLRAugment(crop_scale=crop, degrees=cfg.degrees, translate=cfg.translate, shear=cfg.shear,
                                erase_p=cfg.erase_p, thickness_p=cfg.thickness_p, elastic_p=cfg.elastic_p,
                                hflip_p=cfg.hflip_p, brightness=cfg.brightness, contrast=cfg.contrast,
                                jitter_p=cfg.jitter_p, blur_p=cfg.blur_p, impl=cfg.aug_impl,
                                cpu_kernels=runtime.cpu_kernels) \
            if cfg.aug else torch.nn.Identity()
        return DevicePairs(images, cfg.batch_size, runtime.device, augment, seed=cfg.seed,
                           rank=d.rank, world_size=d.world_size)
    transform = torchvision_transform(crop_scale=crop or (1.0, 1.0), degrees=cfg.degrees, translate=cfg.translate,
                                      shear=cfg.shear, thickness_p=cfg.thickness_p, elastic_p=cfg.elastic_p,
                                      hflip_p=cfg.hflip_p, brightness=cfg.brightness, contrast=cfg.contrast,
                                      jitter_p=cfg.jitter_p, blur_p=cfg.blur_p, identity=not cfg.aug)
    return TorchvisionPairs(images, cfg.batch_size, runtime.device, cfg.workers, seed=cfg.seed,
                            rank=d.rank, world_size=d.world_size, transform=transform)


def load_data(cfg: TrainConfig) -> dict:
    train_x, train_y = load_dataset(cfg.dataset, cfg.data_dir, train=True)
    test_x, test_y = load_dataset(cfg.dataset, cfg.data_dir, train=False)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                classes=dataset_info(cfg.dataset).classes)


def checkpoint_payload(cfg: TrainConfig, tr: Training, pairs: PairSource, state: TrainState) -> dict:
    """Everything a resume needs, as tensors and plain data (fastclr.checkpoint reads it weights-only)."""
    return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(cfg),
            "encoder_hparams": tr.model.encoder.hparams, "encoder": tr.model.encoder.state_dict(),
            "head": tr.model.head.state_dict(), "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(), "scaler": tr.scaler.state_dict(), "rng": rng_state(),
            "loader": pairs.state_dict(), "state": state.to_dict()}


def knn_check(tr: Training, data: dict, cfg: TrainConfig, state: TrainState, t_start: float, show: bool) -> bool:
    """Full-test-set k-NN (the cheap part of the evaluation) for --target-knn; True once reached."""
    t = time.perf_counter()
    acc = evaluate(tr.model.encoder, data, tr.runtime, None, k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
                   tsne_points=0, pixel_knn=False, linear_probe=False, log=lambda *a: None)["knn_accuracy"]
    tr.model.train()
    state.knn_history.append({"step": state.step, "knn_accuracy": acc, "seconds": time.perf_counter() - t_start,
                              "check_seconds": time.perf_counter() - t})
    if show:
        tqdm.write(f"step {state.step}: k-NN accuracy {acc:.4f} (target {cfg.target_knn}) "
                   f"[{time.perf_counter() - t:.1f}s, {time.perf_counter() - t_start:.0f}s since start]")
    return acc >= cfg.target_knn


def record_losses(pending: list, state: TrainState, cfg: TrainConfig, runtime: backend.Runtime, out: Path) -> list[float]:
    """The loop's only host sync: read a block of step losses at once; stop on a non-finite one."""
    vals = torch.stack(pending).cpu().tolist()
    if not all(math.isfinite(v) for v in vals):
        raise FastclrError(
            f"loss became non-finite at step {state.step} (epoch {state.epoch + 1}); the run stops and "
            f"{out / 'checkpoint.pt'} keeps the last good checkpoint. Likely cause: temperature "
            f"{cfg.temperature} too low or lr {cfg.lr} too high"
            + (" or fp16 overflow (try bf16 or no --amp)" if runtime.needs_grad_scaler else ""))
    state.losses.extend(vals)
    return vals


def run_epoch(cfg: TrainConfig, tr: Training, pairs: PairSource, state: TrainState, total_steps: int,
              stop: "StopRequested", knn, save, out: Path, show: bool, world_size: int) -> str:
    """Train from (state.epoch, state.batch) on; returns why it ended: "epoch" (its last batch), "limit"
    (--max-steps), "signal" (SIGTERM/SIGINT), or "target" (--target-knn reached). ``knn()`` runs a k-NN
    check and ``save()`` a mid-epoch checkpoint; neither counts as training time."""
    per_epoch = len(pairs)
    bar = tqdm(total=min(per_epoch, total_steps - state.step + state.batch), initial=state.batch, disable=not show,
               desc=f"epoch {state.epoch + 1}/{cfg.epochs}", unit="step", dynamic_ncols=True, mininterval=0.5)
    pending, ended = [], "epoch"
    backend.synchronize(tr.runtime.device)
    t0 = time.perf_counter()

    def pause() -> None:   # stop the training clock (before a k-NN check or a checkpoint)
        backend.synchronize(tr.runtime.device)
        state.train_seconds += time.perf_counter() - t0

    try:
        for v1, v2 in pairs.iterate(state.batch):
            pending.append(tr.step(v1, v2))
            state.step, state.batch = state.step + 1, state.batch + 1
            last = state.step >= total_steps or state.batch == per_epoch
            if len(pending) >= cfg.log_every or last or stop.signal:
                vals = record_losses(pending, state, cfg, tr.runtime, out)
                pending = []
                elapsed = state.train_seconds + time.perf_counter() - t0
                bar.update(len(vals))
                bar.set_postfix(loss=f"{vals[-1]:.4f}",
                                img_s=f"{2 * cfg.batch_size * world_size * state.step / max(elapsed, 1e-9):.0f}")
            if cfg.target_knn and (state.batch == per_epoch or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                pause()
                reached = knn()
                t0 = time.perf_counter()
                if reached:
                    ended = "target"
                    break
            if stop.signal or state.step >= total_steps:
                ended = "signal" if stop.signal else "limit"
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < per_epoch:
                pause()
                save()
                t0 = time.perf_counter()
    finally:
        bar.close()
    pause()
    if state.batch == per_epoch:
        state.epoch, state.batch = state.epoch + 1, 0
    return ended


def train(cfg: TrainConfig, log=print) -> dict:
    """Train SimCLR as configured, then evaluate; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()  # --target-knn's clock: data loading, training and k-NN checks all count
    cfg.validate()
    runtime = backend.make_runtime(cfg.device, cfg.amp, cfg.compile, cfg.knn_backend, cfg.tsne_backend,
                             cfg.probe_backend, cfg.deterministic)
    d = init_distributed(runtime)
    if runtime.device.type == "cuda" and d.world_size > 1:
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        torch.cuda.set_device(runtime.device)
    check_cuda_graph(cfg, runtime, d.world_size)
    out = prepare_out_dir(cfg) if d.is_main else Path(cfg.out or ".")
    # read (and check) the checkpoint before anything slow: a refused file should fail at once
    ckpt = read_resume_checkpoint(out / "checkpoint.pt", cfg) if cfg.resume else None
    if d.is_main:
        log(f"precision: {runtime.amp_note}")
    seed_everything(cfg.seed)
    data = load_data(cfg)
    train_x = data["train_x"][: cfg.train_subset] if cfg.train_subset else data["train_x"]
    if len(train_x) < cfg.batch_size * d.world_size:
        raise FastclrError(f"--batch-size {cfg.batch_size} x {d.world_size} rank(s) is larger than the "
                           f"{len(train_x)} training images")

    pairs = make_pairs(cfg, train_x, runtime, d)
    total_steps = cfg.epochs * len(pairs)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    tr = build_training(cfg, runtime, total_steps, d.world_size, state=ckpt)
    state = TrainState()
    if ckpt is not None:
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        pairs.load_state_dict(ckpt["loader"])
        log(f"resumed {out} at epoch {state.epoch + 1}, step {state.step}")
    if cfg.cuda_graph:
        tr.captured = CapturedStep(tr, cfg.lr, cfg.warmup_steps, total_steps, state.step,
                                   (cfg.batch_size, 1, *train_x.shape[-2:]))
    if d.is_main:
        log(f"training {cfg.arch} (width {cfg.width}) on {cfg.dataset} (recipe {cfg.recipe}): {len(train_x)} images, "
            f"{len(pairs)} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size} pairs, "
            f"device {runtime.device}, loss {cfg.loss_impl}, loader {cfg.loader}")

    def save() -> None:
        if d.is_main:
            write_checkpoint(checkpoint_payload(cfg, tr, pairs, state), out / "checkpoint.pt")

    knn = functools.partial(knn_check, tr, data, cfg, state, t_start, d.is_main)
    tr.model.train()
    startup_seconds = time.perf_counter() - t_start     # data, model, optimiser: before the first step
    ended = None
    with StopRequested() as stop:
        while state.epoch < cfg.epochs and state.step < total_steps:
            ended = run_epoch(cfg, tr, pairs, state, total_steps, stop, knn, save, out, d.is_main, d.world_size)
            save()
            if ended in ("signal", "target"):
                break
    if ended == "signal":
        if d.is_main:
            log(f"{signal.Signals(stop.signal).name} received: stopped after step {state.step}; checkpoint saved "
                f"to {out / 'checkpoint.pt'}. Continue with: python -m fastclr.train --out {out} --resume "
                "(same settings)")
        raise SystemExit(128 + stop.signal)
    if not d.is_main:
        return {}
    return finish_run(cfg, tr, data, state, out, d, len(pairs), reached=ended == "target", log=log,
                      startup_seconds=startup_seconds)


def finish_run(cfg: TrainConfig, tr: Training, data: dict, state: TrainState, out: Path, d: Dist,
               steps_per_epoch: int, reached: bool, log=print, startup_seconds: float = 0.0) -> dict:
    """Plot the loss, evaluate, write ``metrics.json``; returns the metrics."""
    runtime = tr.runtime
    metrics = {
        "epochs": cfg.epochs, "steps": state.step, "train_seconds": state.train_seconds,
        "train_images_per_second": 2 * cfg.batch_size * d.world_size * state.step / max(state.train_seconds, 1e-9),
        "final_loss": float(np.mean(state.losses[-min(len(state.losses), cfg.log_every):])) if state.losses else None,
        "world_size": d.world_size, "startup_seconds": startup_seconds,
    }
    history = state.knn_history
    if cfg.target_knn:
        metrics.update(target_knn=cfg.target_knn, reached_target=reached, knn_history=history,
                       time_to_target_seconds=history[-1]["seconds"] if reached else None,
                       knn_check_seconds=sum(h.get("check_seconds", 0.0) for h in history))
    plot_loss(state.losses, out / "loss.png", steps_per_epoch)
    knn_fresh = bool(history) and history[-1]["step"] == state.step
    if cfg.eval and knn_fresh and not (cfg.pixel_knn or cfg.linear_probe or cfg.tsne_points):
        metrics["knn_accuracy"] = history[-1]["knn_accuracy"]   # the last target check saw these weights
    elif cfg.eval:
        metrics.update(evaluate(tr.model.encoder, data, runtime, out, k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
                                tsne_points=cfg.tsne_points, pixel_knn=cfg.pixel_knn,
                                linear_probe=cfg.linear_probe, seed=cfg.seed, log=log))
    metrics.update(config=dataclasses.asdict(cfg), device=str(runtime.device), runtime=runtime.describe(),
                   torch_version=torch.__version__, kornia_version=_version("kornia"), git_commit=git_commit(),
                   out=str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"wrote {out}/: checkpoint.pt, metrics.json, loss.png" + (", tsne.png" if cfg.eval and cfg.tsne_points else ""))
    return metrics


def read_resume_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    """The checkpoint --resume continues from, checked against ``cfg``; on the CPU (RNG states stay there)."""
    ckpt = read_checkpoint(path)
    if "state" not in ckpt:
        raise FastclrError(f"{path} was written by an older fastclr (checkpoint format {ckpt.get('format')}): its "
                           "encoder loads (fastclr.eval, load_encoder) but --resume needs format "
                           f"{CHECKPOINT_FORMAT}; start a new run")
    _check_resumable(ckpt["config"], cfg)
    return ckpt


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


# settings that change what a resumed run computes; anything else (logging, evaluation, output) may differ
_RESUME_KEYS = ("dataset", "arch", "width", "embed_dim", "proj_hidden", "proj_dim", "proj_bn", "epochs", "max_steps",
                "batch_size", "lr", "weight_decay", "warmup_steps", "temperature", "seed", "train_subset", "loader",
                "aug", "aug_impl", "crop_min", "degrees", "translate", "shear", "erase_p", "thickness_p", "elastic_p",
                "hflip_p", "brightness", "contrast", "jitter_p", "blur_p", "cuda_graph")


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    # a key a checkpoint lacks was written before that setting existed: it ran with the default
    diff = [k for k in _RESUME_KEYS if saved.get(k, getattr(TrainConfig(), k)) != getattr(cfg, k)]
    if diff:
        pairs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff)
        raise FastclrError(f"--resume needs the settings of the saved run: {pairs}")


def main(argv=None) -> int:
    parser = build_parser(description="Train SimCLR (NT-Xent) on MNIST or Fashion-MNIST, then evaluate "
                                      "(k-NN, linear probe, t-SNE).")
    try:
        cfg = resolve_config(given_flags(parser, argv))
        metrics = train(cfg)
    except FastclrError as exc:
        print(f"fastclr.train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if metrics and "knn_accuracy" in metrics:
        print(f"knn_accuracy {metrics['knn_accuracy']:.4f} (raw pixels {metrics.get('pixel_knn_accuracy', float('nan')):.4f}), "
              f"{metrics['train_images_per_second']:.0f} images/s over {metrics['train_seconds']:.1f}s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
