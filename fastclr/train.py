"""SimCLR training: ``python -m fastclr.train ...`` trains, checkpoints, evaluates and writes a run folder.

:func:`train` builds a run from a TrainConfig (runtime, data, view pairs, :func:`build_training`), hands it to a
:class:`Trainer`, whose ``fit()`` is the loop, and :func:`finish_run` evaluates and writes ``metrics.json``.
:func:`train_step` is the one training step, eager or captured as a CUDA graph.

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
from .augment import SimCLRAugment, views_per_call
from .capture import CapturedStep
from .checkpoint import (TrainState, loop_state, make_payload, read_resume_checkpoint, restore_training,
                         write_checkpoint)
from .config import TrainConfig, build_parser, given_flags, resolve_config
from .data import DevicePairs, PairSource, TorchvisionPairs, dataset_info, torchvision_transform
from .errors import FastclrError
from .eval import evaluate
from .loss import NTXentLoss
from .model import build_model
from .schedule import make_scheduler
from .sources import ImageData, SourceSpec, load_source


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

def check_out_dir(cfg: TrainConfig) -> Path:
    """The run folder, checked (a resume needs its checkpoint; another run is not overwritten), not yet made:
    it is made once the data has been read, so that bad data leaves nothing behind."""
    out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = out / "checkpoint.pt"
    if cfg.resume:
        if not ckpt.is_file():
            raise FastclrError(f"--resume: no checkpoint at {ckpt}; start without --resume")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FastclrError(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                           "or choose another --out")
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


# --------------------------------------------------------------------------- the step

def views_loss(model, loss_fn, v1, v2, runtime: backend.Runtime, channels_last: bool = False) -> torch.Tensor:
    """NT-Xent of a (B, C, H, W) view pair through ``model``, under the runtime's autocast; a () tensor.

    Both views go through the network as one 2B batch: one kernel launch per layer instead of two."""
    if channels_last:    # cat straight into the channels_last layout: one copy instead of two
        x = torch.empty((2 * len(v1), *v1.shape[1:]), dtype=v1.dtype, device=v1.device,
                        memory_format=torch.channels_last)
        torch.cat([v1, v2], out=x)
    else:
        x = torch.cat([v1, v2])
    with runtime.autocast():
        z = model(x)
    return loss_fn(*z.float().chunk(2))


@dataclasses.dataclass
class Training:
    """What a training step needs, assembled from the config in one place (:func:`build_training`)."""

    model: torch.nn.Module        # SimCLRModel: the weights that are saved and evaluated
    net: torch.nn.Module          # what the step calls: ``model``, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: object             # LambdaLR, or fastclr.schedule.DeviceSchedule for a captured step
    scaler: torch.amp.GradScaler
    loss_fn: NTXentLoss
    runtime: backend.Runtime
    channels_last: bool
    captured: CapturedStep | None = None     # --cuda-graph: train_step as a replayed CUDA graph

    def step(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """One step on a (B, C, H, W) view pair; the loss as a device tensor (no host sync)."""
        return self.captured(v1, v2) if self.captured is not None else train_step(self, v1, v2)

    def views_loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """The loss of a view pair through ``net``, without a step."""
        return views_loss(self.net, self.loss_fn, v1, v2, self.runtime, self.channels_last)


def train_step(tr: Training, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """THE training step, eager or inside the captured graph: forward, loss, backward, optimiser, schedule.

    The gradients are cleared after the update: to None in an eager run (the next backward allocates them
    afresh, as zero_grad before it would), to zeros in a captured one (the graph's backward writes into the
    same buffers on every replay). The GradScaler is a no-op unless fp16 needs it (never when captured)."""
    loss = tr.views_loss(v1, v2)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    tr.optimizer.zero_grad(set_to_none=tr.captured is None)
    tr.scheduler.step()
    return loss.detach()


def build_training(cfg: TrainConfig, runtime: backend.Runtime, total_steps: int, world_size: int = 1,
                   ckpt: dict | None = None, data: ImageData | None = None) -> Training:
    """Model, optimiser (AdamW, fused where available), schedule, scaler, loss and, for ``--cuda-graph``, the
    captured step, as ``cfg`` says; a checkpoint ``ckpt`` is loaded before compiling and DDP-wrapping. The
    encoder takes ``data``'s image shape and normalisation (default: a built-in dataset's, 1 x 28 x 28)."""
    info = data if data is not None else dataset_info(cfg.dataset)       # both carry .mean and .std
    norm = (info.mean, info.std)
    model = build_model(cfg.arch, cfg.width, cfg.embed_dim, cfg.proj_hidden, cfg.proj_dim, norm, cfg.proj_bn,
                        data.shape if data is not None else (1, 28, 28))
    if world_size > 1 and runtime.device.type == "cuda":
        # BN statistics over the global batch. PyTorch's SyncBatchNorm runs on GPUs only: CPU (gloo) ranks
        # keep per-rank BN statistics (docs/reliability.md).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device)
    model.encoder.cpu_kernels = runtime.cpu_kernels
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = runtime.optimizer(model.parameters(), cfg.lr, cfg.weight_decay, capturable=cfg.cuda_graph)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, total_steps, on_device=cfg.cuda_graph)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.needs_grad_scaler)
    tr = Training(model, model, optimizer, scheduler, scaler,
                  NTXentLoss(cfg.temperature, cfg.loss_impl, gather_distributed=world_size > 1, check_finite=False),
                  runtime, cfg.channels_last)
    if ckpt is not None:
        restore_training(tr, ckpt)
    tr.net = runtime.compiled(model)
    if world_size > 1:
        tr.net = torch.nn.parallel.DistributedDataParallel(
            tr.net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if cfg.cuda_graph:
        if runtime.needs_grad_scaler:
            raise FastclrError("--cuda-graph needs bf16 or fp32: fp16's GradScaler keeps its state on the host")
        tr.captured = CapturedStep(functools.partial(train_step, tr), runtime.device)
    return tr


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
    """The configured view-pair source, both drawing ``cfg.augment``'s views: the device-resident loader with
    SimCLRAugment (fused or Kornia's chain), or a DataLoader with torchvision's transforms."""
    size = tuple(images.shape[-2:])
    aug = cfg.augment.scaled_to(size)
    if cfg.loader == "device":
        augment = SimCLRAugment(aug, size, cfg.aug_impl, runtime.cpu_kernels) if cfg.aug else torch.nn.Identity()
        return DevicePairs(images, cfg.batch_size, runtime.device, augment, seed=cfg.seed, rank=d.rank,
                           world_size=d.world_size, block_views=views_per_block(cfg, images.shape[1:]))
    transform = torchvision_transform(aug, size, identity=not cfg.aug)
    return TorchvisionPairs(images, cfg.batch_size, runtime.device, transform, cfg.workers, seed=cfg.seed,
                            rank=d.rank, world_size=d.world_size)


def load_data(cfg: TrainConfig, runtime: backend.Runtime, world_size: int, log) -> tuple[ImageData, torch.Tensor]:
    """The source, read and checked (``fastclr.sources``), and the images SimCLR trains on; FastclrError where the
    settings cannot work with it."""
    data = load_source(SourceSpec.of(cfg))
    for note in data.notes:
        log(note)
    train_x = data.pretrain_x if data.pretrain_x is not None else data.train_x
    train_x = train_x[: cfg.train_subset] if cfg.train_subset else train_x
    if len(train_x) < cfg.batch_size * world_size:
        raise FastclrError(f"--batch-size {cfg.batch_size} x {world_size} rank(s) is larger than the "
                           f"{len(train_x)} training images")
    if cfg.aug and cfg.augment.needs_rgb and data.shape[0] == 1:
        raise FastclrError(f"--color-saturation and --color-hue need colour images, and {cfg.dataset} has one "
                           "channel: set both to 0 (the colour brightness and contrast still apply)")
    if cfg.target_knn and not data.labelled:
        raise FastclrError(f"--target-knn needs labels, and {cfg.dataset} has none (or no test split)")
    check_memory(train_x, cfg, runtime)
    return data, train_x


def kernel_paths(cfg: TrainConfig, shape) -> str:
    """Which path each stage takes on the CPU for (C, H, W) images (fastclr.kernels' own checks decide at run
    time; this says what they will find)."""
    from .kernels import MAX_WIDTH

    c, h, w = shape
    views = "kernels" if cfg.aug and cfg.aug_impl == "fused" and w <= MAX_WIDTH else "PyTorch ops"
    pool = "kernel" if (cfg.arch == "tutorial" or cfg.width % 16 == 0) and h % 4 == 0 and w % 4 == 0 else "PyTorch ops"
    first = ("kernel" if cfg.arch == "tutorial" and c == 1 and h % 2 == 0 and w % 2 == 0 and max(h, w) <= 64
             else "PyTorch ops")
    return (f"warp and thickness {views}" + (f" (each of the {c} channels as a sample)" if c > 1 else "")
            + f"; max-pool + ReLU {pool}; the tutorial net's first block {first}")


def check_memory(train_x: torch.Tensor, cfg: TrainConfig, runtime: backend.Runtime) -> None:
    """FastclrError naming the bytes a run needs on its device (the uint8 images, plus one block of float views
    and the warp's buffers, about 8 floats per view pixel) where they exceed the device's free memory."""
    view = train_x[0].numel()
    resident = train_x.numel() if runtime.device.type != "cpu" else 0     # on the CPU the images are there already
    need = resident + 8 * 4 * view * views_per_block(cfg, train_x.shape[1:])
    free = backend.free_memory(runtime.device)
    if free is not None and need > free:
        raise FastclrError(f"the data needs about {need / 2**30:.2f} GiB on {runtime.device} ({len(train_x)} images "
                           f"of {'x'.join(map(str, train_x.shape[1:]))} as uint8, plus the augmentation's buffers), "
                           f"and {free / 2**30:.2f} GiB are free; use --train-subset, a smaller --image-size, or "
                           "another device")


def views_per_block(cfg: TrainConfig, shape) -> int:
    """Views per augmentation call for (C, H, W) images: ``fastclr.augment.views_per_call``'s rule, at least one
    batch of pairs."""
    per_call = views_per_call(cfg.aug_impl, shape) if cfg.aug else None
    return max(2 * cfg.batch_size, per_call or 0)


class Clock:
    """Training time (``state.train_seconds``) only: stopped around k-NN checks and checkpoints, and read with
    the device synchronised so that queued steps count where they ran."""

    def __init__(self, state: TrainState, device: torch.device):
        self.state, self.device, self.t0 = state, device, 0.0

    def start(self) -> None:
        backend.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        backend.synchronize(self.device)
        self.state.train_seconds += time.perf_counter() - self.t0

    def elapsed(self) -> float:
        return self.state.train_seconds + time.perf_counter() - self.t0


class Trainer:
    """The training loop of one run (built by :func:`train`); :meth:`fit` reads top to bottom.

    State lives in ``state`` (a TrainState: what a checkpoint saves); ``pending`` holds the step losses not yet
    read back (the loop's only host sync is reading them, a block every ``--log-every`` steps)."""

    def __init__(self, cfg: TrainConfig, tr: Training, pairs: PairSource, state: TrainState, data: ImageData,
                 out: Path, d: Dist, t_start: float):
        self.cfg, self.tr, self.pairs, self.state, self.data, self.out, self.d = cfg, tr, pairs, state, data, out, d
        self.t_start = t_start            # --target-knn's clock: data loading, training and k-NN checks all count
        self.total_steps, self.epochs = total_steps(cfg, len(pairs)), epochs_planned(cfg, len(pairs))
        self.clock, self.pending, self.stop = Clock(state, tr.runtime.device), [], StopRequested()
        self.marks: list[tuple[int, float]] = []   # (steps this process ran, training seconds) at each loss read
        self.first_step = state.step

    def fit(self) -> str:
        """Train from ``state`` on; returns why it ended: "done" (all steps), "target" (--target-knn reached) or
        "signal" (SIGTERM/SIGINT: the step finished and a checkpoint saved)."""
        cfg, st = self.cfg, self.state
        self.tr.model.train()
        with self.stop as stop:
            while st.epoch < self.epochs and st.step < self.total_steps:             # epoch
                ended = "epoch"
                with self.progress_bar() as bar:
                    self.clock.start()
                    for v1, v2 in self.pairs.iterate(st.batch):                      # batch
                        self.pending.append(self.tr.step(v1, v2))                    # step
                        st.step, st.batch = st.step + 1, st.batch + 1
                        if len(self.pending) >= cfg.log_every or self.epoch_or_run_ends() or stop.signal:
                            self.log_losses(bar)                                     # log
                        if self.knn_due() and self.paused(self.knn_check):           # maybe k-NN
                            ended = "target"
                            break
                        if stop.signal or st.step >= self.total_steps:
                            ended = "signal" if stop.signal else "limit"
                            break
                        if self.checkpoint_due():                                    # maybe checkpoint
                            self.paused(self.save)
                    self.clock.stop()
                if st.batch == len(self.pairs):
                    st.epoch, st.batch = st.epoch + 1, 0
                self.save()                                                          # at each epoch's end
                if ended in ("signal", "target"):
                    return ended
        return "done"

    def progress_bar(self) -> tqdm:
        st, per_epoch = self.state, len(self.pairs)
        return tqdm(total=min(per_epoch, self.total_steps - st.step + st.batch), initial=st.batch,
                    disable=not self.d.is_main, desc=f"epoch {st.epoch + 1}/{self.epochs}", unit="step",
                    dynamic_ncols=True, mininterval=0.5)

    def epoch_or_run_ends(self) -> bool:
        return self.state.step >= self.total_steps or self.state.batch == len(self.pairs)

    def knn_due(self) -> bool:
        """A --target-knn check after this step: at each epoch's end, every --eval-every steps, and after the run's
        last step (--steps or --max-steps can end it mid-epoch: its final weights are checked too)."""
        cfg, st = self.cfg, self.state
        return bool(cfg.target_knn) and (st.batch == len(self.pairs) or st.step >= self.total_steps
                                         or bool(cfg.eval_every and st.step % cfg.eval_every == 0))

    def checkpoint_due(self) -> bool:
        every, st = self.cfg.checkpoint_every, self.state
        return bool(every) and st.step % every == 0 and st.batch < len(self.pairs)

    def paused(self, fn):
        """``fn()`` with the training clock stopped (a k-NN check or a checkpoint is not training time)."""
        self.clock.stop()
        result = fn()
        self.clock.start()
        return result

    def log_losses(self, bar: tqdm) -> None:
        """Read the pending losses at once; stop on a non-finite one; show the last and the images/s."""
        vals = torch.stack(self.pending).cpu().tolist()
        self.pending = []
        if not all(math.isfinite(v) for v in vals):
            cfg, st = self.cfg, self.state
            raise FastclrError(
                f"loss became non-finite at step {st.step} (epoch {st.epoch + 1}); the run stops and "
                f"{self.out / 'checkpoint.pt'} keeps the last good checkpoint. Likely cause: temperature "
                f"{cfg.temperature} too low or lr {cfg.lr} too high"
                + (" or fp16 overflow (try bf16 or no --amp)" if self.tr.runtime.needs_grad_scaler else ""))
        self.state.losses.extend(vals)
        seconds = self.clock.elapsed()                       # the read above synced every step before it
        self.marks.append((self.state.step - self.first_step, seconds))
        bar.update(len(vals))
        bar.set_postfix(loss=f"{vals[-1]:.4f}", img_s=f"{self.images_per_second(seconds):.0f}")

    def images_per_second(self, seconds: float) -> float:
        return self.images_per_step() * self.state.step / max(seconds, 1e-9)

    def images_per_step(self) -> int:
        return 2 * self.cfg.batch_size * self.d.world_size

    def steady_state(self) -> dict:
        """Images/s over the steady-state steps (``steady_images_per_second``) and the steps they span."""
        rate, span = steady_images_per_second(self.marks, self.images_per_step())
        return {"steady_images_per_second": rate, "steady_state_steps": span}

    def knn_check(self) -> bool:
        """Full-test-set k-NN (the cheap part of the evaluation) for --target-knn; True once reached."""
        cfg, st, t = self.cfg, self.state, time.perf_counter()
        knn_only = dataclasses.replace(cfg, pixel_knn=False, linear_probe=False, tsne_points=0)
        acc = evaluate(self.tr.model.encoder, self.data.for_eval(), self.tr.runtime, knn_only,
                       log=lambda *a: None)["knn_accuracy"]
        self.tr.model.train()
        now = time.perf_counter()
        st.knn_history.append({"step": st.step, "knn_accuracy": acc, "seconds": now - self.t_start,
                               "check_seconds": now - t})
        if self.d.is_main:
            tqdm.write(f"step {st.step}: k-NN accuracy {acc:.4f} (target {cfg.target_knn}) "
                       f"[{now - t:.1f}s, {now - self.t_start:.0f}s since start]")
        return acc >= cfg.target_knn

    def save(self) -> None:
        if self.d.is_main:
            write_checkpoint(make_payload(self.cfg, self.tr, self.pairs.state_dict(), self.state),
                             self.out / "checkpoint.pt")


# Steps left out of the steady-state figure: --cuda-graph's 3 eager warm-up steps and its capture, torch.compile's
# first call (and reduce-overhead's CUDA-graph warm-up and recording calls after it), loss_impl auto's one-time
# timing and the first augmentation block's allocations all fall in the first few steps. At 300,000 images/s an
# MNIST epoch is 0.4 s, so these would dominate a whole-epoch average.
STEADY_AFTER_STEPS = 20


def steady_images_per_second(marks: list[tuple[int, float]], images_per_step: int,
                             after: int = STEADY_AFTER_STEPS) -> tuple[float | None, list[int] | None]:
    """Images/s between the first mark at or after step ``after`` and the last mark, and those two steps;
    (None, None) with fewer than two such marks. ``marks``: (steps run, training seconds) at each read of the
    losses, where the device has finished every step before it."""
    late = [(s, t) for s, t in marks if s >= after]
    if len(late) < 2 or late[-1][1] <= late[0][1]:
        return None, None
    (s0, t0), (s1, t1) = late[0], late[-1]
    return images_per_step * (s1 - s0) / (t1 - t0), [s0, s1]


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's optimiser steps (the schedule's length): --steps, else every epoch's; --max-steps where that is
    fewer."""
    planned = cfg.steps or cfg.epochs * steps_per_epoch
    return min(planned, cfg.max_steps or planned)


def epochs_planned(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """--epochs, or the epochs --steps takes."""
    return -(-cfg.steps // steps_per_epoch) if cfg.steps else cfg.epochs


def setup_runtime(cfg: TrainConfig) -> tuple[backend.Runtime, Dist]:
    """The Runtime (fastclr.backend decides) and this process's place in a torchrun group."""
    runtime = backend.make_runtime(cfg.device, cfg.amp, cfg.compile, cfg.knn_backend, cfg.tsne_backend,
                                   cfg.probe_backend, cfg.deterministic, cfg.compile_mode)
    d = init_distributed(runtime)
    if runtime.device.type == "cuda" and d.world_size > 1:
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        torch.cuda.set_device(runtime.device)
    check_cuda_graph(cfg, runtime, d.world_size)
    check_loss_impl(cfg, runtime)
    return runtime, d


def check_loss_impl(cfg: TrainConfig, runtime: backend.Runtime) -> None:
    """--loss-impl triton where its kernels cannot run: one clear error before the data is read, not a
    traceback at the first step."""
    if cfg.loss_impl == "triton":
        from . import triton_ntxent

        reason = triton_ntxent.cannot_run_on(runtime.device.type)
        if reason:
            raise FastclrError(f"--loss-impl triton: {reason}")


def train(cfg: TrainConfig, log=print) -> dict:
    """Train SimCLR as configured, then evaluate; returns the metrics written to ``metrics.json``."""
    t_start = time.perf_counter()
    cfg.validate()
    runtime, d = setup_runtime(cfg)
    out = check_out_dir(cfg) if d.is_main else Path(cfg.out or ".")
    # read (and check) the checkpoint before anything slow: a refused file should fail at once
    ckpt = read_resume_checkpoint(out / "checkpoint.pt", cfg) if cfg.resume else None
    if d.is_main:
        log(f"precision: {runtime.amp_note}")
    seed_everything(cfg.seed)
    data, train_x = load_data(cfg, runtime, d.world_size, log if d.is_main else lambda *a: None)
    pairs = make_pairs(cfg, train_x, runtime, d)
    tr = build_training(cfg, runtime, total_steps(cfg, len(pairs)), d.world_size, ckpt, data)
    if d.is_main:    # made once the data and the model are known to work: a refused run leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
    state = TrainState()
    if ckpt is not None:
        state, loader_state = loop_state(ckpt)
        pairs.load_state_dict(loader_state)
        log(f"resumed {out} at epoch {state.epoch + 1}, step {state.step}")
    if d.is_main:
        shape, epochs = "x".join(map(str, train_x.shape[1:])), epochs_planned(cfg, len(pairs))
        log(f"training {cfg.arch} (width {cfg.width}) on {cfg.dataset} (recipe {cfg.recipe}): {len(train_x)} images "
            f"of {shape}, {len(pairs)} steps/epoch x {epochs} epochs, batch {cfg.batch_size} pairs, "
            f"device {runtime.device}, loss {cfg.loss_impl}, loader {cfg.loader}")
        if runtime.cpu_kernels:
            log(f"CPU kernels: {kernel_paths(cfg, train_x.shape[1:])}")
    trainer = Trainer(cfg, tr, pairs, state, data, out, d, t_start)
    startup_seconds = time.perf_counter() - t_start     # data, model, optimiser: before the first step
    ended = trainer.fit()
    if ended == "signal":
        sig = signal.Signals(trainer.stop.signal)
        if d.is_main:
            log(f"{sig.name} received: stopped after step {state.step}; checkpoint saved to {out / 'checkpoint.pt'}. "
                f"Continue with: python -m fastclr.train --out {out} --resume (same settings)")
        raise SystemExit(128 + sig)
    if not d.is_main:
        return {}
    return finish_run(trainer, reached=ended == "target", startup_seconds=startup_seconds, log=log)


def finish_run(trainer: Trainer, reached: bool, startup_seconds: float, log=print) -> dict:
    """Plot the loss, evaluate, write ``metrics.json``; returns the metrics."""
    cfg, tr, state, out = trainer.cfg, trainer.tr, trainer.state, trainer.out
    runtime = tr.runtime
    metrics = {
        "epochs": trainer.epochs, "steps": state.step, "train_seconds": state.train_seconds,
        "train_images_per_second": trainer.images_per_second(state.train_seconds),
        "final_loss": float(np.mean(state.losses[-min(len(state.losses), cfg.log_every):])) if state.losses else None,
        **trainer.steady_state(),
        "world_size": trainer.d.world_size, "startup_seconds": startup_seconds,
    }
    history = state.knn_history
    if cfg.target_knn:
        metrics.update(target_knn=cfg.target_knn, reached_target=reached, knn_history=history,
                       time_to_target_seconds=history[-1]["seconds"] if reached else None,
                       knn_check_seconds=sum(h.get("check_seconds", 0.0) for h in history))
    plot_loss(state.losses, out / "loss.png", len(trainer.pairs))
    knn_fresh = bool(history) and history[-1]["step"] == state.step
    if cfg.eval and knn_fresh and not (cfg.pixel_knn or cfg.linear_probe or cfg.tsne_points):
        metrics["knn_accuracy"] = history[-1]["knn_accuracy"]   # the last target check saw these weights
    elif cfg.eval:
        metrics.update(evaluate(tr.model.encoder, trainer.data.for_eval(), runtime, cfg, out, log=log))
    metrics.update(config=cfg.to_dict(), device=str(runtime.device), runtime=runtime.describe(),
                   torch_version=torch.__version__, kornia_version=_version("kornia"), git_commit=git_commit(),
                   out=str(out))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"wrote {out}/: checkpoint.pt, metrics.json, loss.png" + (", tsne.png" if cfg.eval and cfg.tsne_points else ""))
    return metrics


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return None


def summary_line(metrics: dict) -> str:
    """The CLI's last line: k-NN (and raw pixels') where evaluated, then the training speed."""
    parts = []
    if metrics.get("knn_accuracy") is not None:
        pixels = metrics.get("pixel_knn_accuracy")
        parts.append(f"knn_accuracy {metrics['knn_accuracy']:.4f}"
                     + (f" (raw pixels {pixels:.4f})" if pixels is not None else ""))
    speed = f"{metrics['train_images_per_second']:.0f} images/s over {metrics['train_seconds']:.1f}s of training"
    if metrics.get("steady_images_per_second"):
        first, last = metrics["steady_state_steps"]
        speed += f" ({metrics['steady_images_per_second']:.0f} at steady state, steps {first}-{last})"
    return ", ".join(parts + [speed])


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
    if metrics:
        print(summary_line(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
