"""The learning-rate schedule, defined once: linear warm-up to the peak, then cosine decay to 0.

The eager step advances a ``LambdaLR`` that evaluates :func:`lr_factor` on the host. The captured step
(``--cuda-graph``) cannot read the host inside its graph, so :class:`DeviceSchedule` keeps the step count and the
learning rate as device tensors and evaluates the same :func:`lr_factor` on them; ``tests/test_schedule.py``
checks the two against each other.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def lr_factor(step, warmup: int, total: int):
    """The peak learning rate's factor at ``step``: (step + 1) / warmup during the warm-up, then
    0.5 (1 + cos(pi min(1, (step - warmup) / (total - warmup)))).

    ``step``: an int (returns a float, the eager path) or a () tensor on any device (returns a () float32 tensor
    with no host sync, the captured path)."""
    if not isinstance(step, Tensor):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    s = step.float()
    warm = (s + 1) / max(1, warmup)
    progress = ((s - warmup) / max(1, total - warmup)).clamp(max=1.0)
    return torch.where(s < warmup, warm, 0.5 * (1 + torch.cos(math.pi * progress)))


class DeviceSchedule:
    """:func:`lr_factor` as a device tensor that ``step()`` advances without a host sync, for a captured step.

    Every parameter group's ``lr`` becomes the one tensor ``lr_t`` (AdamW with ``capturable=True`` reads it on
    each step). ``state_dict()`` holds LambdaLR's ``last_epoch`` (steps taken)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int):
        self.optimizer = optimizer
        group = optimizer.param_groups[0]
        dev = group["params"][0].device
        self.peak, self.warmup, self.total = float(group["lr"]), warmup, total
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self.lr_t = torch.zeros((), dtype=torch.float32, device=dev)
        self._set()
        self._bind()

    def _bind(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_t

    def _set(self) -> None:
        self.lr_t.copy_(self.peak * lr_factor(self.step_t, self.warmup, self.total))

    def step(self) -> None:
        self.step_t += 1
        self._set()

    def state_dict(self) -> dict:
        return {"last_epoch": int(self.step_t)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count; call after the optimiser's ``load_state_dict``, which replaces the groups'
        ``lr`` with the saved tensor: the groups are bound to ``lr_t`` again."""
        self.step_t.fill_(int(state["last_epoch"]))
        self._set()
        self._bind()


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, on_device: bool):
    """The schedule for ``optimizer``: a DeviceSchedule for a captured step, else LambdaLR over lr_factor."""
    if on_device:
        return DeviceSchedule(optimizer, warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
