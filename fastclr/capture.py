"""One training step captured as a CUDA graph and replayed (``--cuda-graph``).

Why: a step of fastclr's ~100k-parameter CNN on 28x28 images is a few hundred small kernels (forward, loss,
backward, AdamW). On a large GPU each takes microseconds, so the GPU waits on the Python launching them, not
on arithmetic. Captured once, the whole step is replayed by one ``cudaGraphLaunch``.

What capture needs, and how fastclr provides it:

* No host synchronisation and no host-side state inside the step. The learning-rate schedule is a device
  tensor the step itself advances (``fastclr.schedule.DeviceSchedule``: the same ``lr_factor``), AdamW runs
  with ``capturable=True`` (its step counts live on the device) and a tensor learning rate, and the loss stays
  on the device (the loop reads a block of losses every ``--log-every`` steps). fp16 autocast needs
  GradScaler's host-side scale bookkeeping, so capture takes bf16 or fp32.
* Static inputs and outputs: each step's views are copied into two fixed buffers (a device-to-device copy),
  and the loss is cloned out of the graph's fixed output tensor.
* Warm-up before capture: the first ``warmup_steps`` steps run eagerly on a side stream, which lets cuDNN and
  AdamW allocate their workspaces and state before the capture records the memory addresses. They are real
  training steps on real batches, so a captured run computes the same steps as an eager one.

The step itself is ``fastclr.train.train_step`` (the eager one), handed in as ``step_fn``; ``build_training``
wires it. ``tests/test_capture.py`` checks the captured step against eager steps on the CPU (run eagerly) and,
on a GPU, the replayed graph against eager steps.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class CapturedStep:
    """``step_fn(v1, v2)`` (one whole training step, returning the loss) captured as a CUDA graph after
    ``warmup_steps`` eager calls, then replayed; ``capture=False`` or a non-CUDA ``device``: always eager, on the
    same static buffers (how the CPU tests run it)."""

    def __init__(self, step_fn: Callable[[Tensor, Tensor], Tensor], device: torch.device, warmup_steps: int = 3,
                 capture: bool = True):
        self.step_fn, self.warmup_steps = step_fn, warmup_steps
        self.capture = capture and device.type == "cuda"
        self.v1: Tensor | None = None
        self.v2: Tensor | None = None
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: Tensor | None = None

    def body(self) -> Tensor:
        return self.step_fn(self.v1, self.v2)

    def __call__(self, v1: Tensor, v2: Tensor) -> Tensor:
        """One step on a view pair (B, C, H, W) each; returns the loss as a () device tensor of its own."""
        if self.v1 is None:                  # the static buffers, made before any capture records addresses
            self.v1, self.v2 = torch.empty_like(v1), torch.empty_like(v2)
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
