"""One training step captured as a CUDA graph and replayed (``--cuda-graph``).

Why: a step of fastclr's ~100k-parameter CNN on 28x28 images is a few hundred small kernels (forward, loss,
backward, AdamW). On a large GPU each takes microseconds, so the GPU waits on the Python launching them, not
on arithmetic. Captured once, the whole step is replayed by one ``cudaGraphLaunch``.

What capture needs, and how this module provides it:

* No host synchronisation and no host-side state inside the step. The learning-rate schedule becomes a device
  tensor that the step itself advances (:func:`lr_factor_tensor`, the same warm-up and cosine as
  ``fastclr.train.lr_factor``), AdamW runs with ``capturable=True`` (its step counts live on the device) and a
  tensor learning rate, and the loss stays on the device (the loop reads a block of losses every
  ``--log-every`` steps). fp16 autocast needs GradScaler's host-side scale bookkeeping, so capture takes bf16
  or fp32.
* Static inputs and outputs: each step's views are copied into two fixed buffers (a device-to-device copy),
  and the loss is cloned out of the graph's fixed output tensor.
* Warm-up before capture: the first ``warmup_steps`` steps run eagerly on a side stream, which lets cuDNN and
  AdamW allocate their workspaces and state before the capture records the memory addresses. They are real
  training steps on real batches, so a captured run computes the same steps as an eager one.

The view pairs come from ``DevicePairs``, which augments 4,096 views per call on the device, drawing every random
parameter there (``fastclr.sampling``): one augmentation call per 16 steps of 128 pairs, outside the graph.
``tests/test_capture.py`` checks the step body against ``fastclr.train.train_step`` on the CPU and, on a GPU,
the replayed graph against eager steps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def lr_factor_tensor(step: Tensor, warmup: int, total: int) -> Tensor:
    """``fastclr.train.lr_factor`` on a device tensor (no host sync): linear warm-up to 1 over ``warmup`` steps,
    then cosine decay to 0 at ``total``. step: () tensor; returns a () float32 tensor."""
    s = step.float()
    warm = (s + 1) / max(1, warmup)
    progress = ((s - warmup) / max(1, total - warmup)).clamp(max=1.0)
    return torch.where(s < warmup, warm, 0.5 * (1 + torch.cos(math.pi * progress)))


class CapturedStep:
    """The training step of a :class:`fastclr.train.Training`, captured as a CUDA graph after ``warmup_steps``
    eager steps (``capture=False``: the same body, always eager; this is how the CPU tests run it).

    Args:
        tr: the Training whose model, optimiser, loss and runtime the step uses. Its optimiser must take a tensor
            learning rate (``Runtime.optimizer(..., capturable=True)``); the LambdaLR scheduler is not stepped.
        peak_lr, warmup, total_steps: the schedule (``--lr``, ``--warmup-steps``, the run's steps).
        start_step: steps already taken (a resumed run).
        batch_shape: (B, C, H, W) of one view batch.
    """

    def __init__(self, tr, peak_lr: float, warmup: int, total_steps: int, start_step: int,
                 batch_shape: tuple[int, ...], warmup_steps: int = 3, capture: bool = True):
        if tr.runtime.needs_grad_scaler:
            raise ValueError("a captured step needs bf16 or fp32: fp16's GradScaler keeps its state on the host")
        self.tr, self.peak_lr, self.warmup, self.total = tr, peak_lr, warmup, total_steps
        dev = tr.runtime.device
        self.step_t = torch.tensor(start_step, dtype=torch.int64, device=dev)
        self.lr_t = (peak_lr * lr_factor_tensor(self.step_t, warmup, total_steps)).to(torch.float32)
        for group in tr.optimizer.param_groups:
            group["lr"] = self.lr_t          # one tensor the graph writes; AdamW reads it each step
        self.v1 = torch.zeros(batch_shape, device=dev)
        self.v2 = torch.zeros(batch_shape, device=dev)
        self.capture, self.warmup_steps = capture and dev.type == "cuda", warmup_steps
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None

    def body(self) -> Tensor:
        """Forward, loss, backward, AdamW and the schedule's advance on the static buffers; the loss tensor."""
        tr = self.tr
        loss = tr.views_loss(self.v1, self.v2)
        loss.backward()
        tr.optimizer.step()
        # set_to_none=False: the graph's backward writes into the same gradient buffers on every replay
        tr.optimizer.zero_grad(set_to_none=False)
        self.step_t += 1
        self.lr_t.copy_(self.peak_lr * lr_factor_tensor(self.step_t, self.warmup, self.total))
        return loss.detach()

    def __call__(self, v1: Tensor, v2: Tensor) -> Tensor:
        """One step on a view pair (B, C, H, W) each; returns the loss as a () device tensor of its own."""
        self.v1.copy_(v1)
        self.v2.copy_(v2)
        if self.graph is not None:
            self.graph.replay()
            return self.loss.clone()
        if not self.capture:
            return self.body()
        if self.eager_steps < self.warmup_steps:
            self.eager_steps += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.body()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self.body()
        self.graph.replay()          # capture only records: this runs the step
        return self.loss.clone()
