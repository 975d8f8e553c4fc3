"""Checkpoints: the one place that writes and reads them, owns their schema, and checks a resume.

The payload (:func:`make_payload`) holds the flat config, the encoder's hyperparameters and weights, the head,
optimiser, schedule and scaler states, the RNG and data-order states and the loop's :class:`TrainState`.
Only this module reads its keys: :func:`encoder_state` for ``load_encoder``, :func:`restore_training` for a
resumed run, :func:`check_resume` against the settings' resume rules (``fastclr.config``: a ``FIXED``
setting must keep its saved value).

Writing is atomic (temporary file in the same folder, fsync, rename), so a kill at any moment leaves the
previous checkpoint or the new one. A write that fails (full disk, folder gone or read-only) removes its
temporary file and raises :class:`CheckpointWriteError`, which the CLI prints as one line.

Reading never executes code: ``torch.load(weights_only=True)`` accepts tensors and plain Python data
(dict, list, tuple, str, int, float, bool, None) and nothing else, so a crafted file whose pickle names a
callable (``os.system``, ...) is refused before anything in it runs. Everything fastclr saves is of those
kinds: RNG states are stored as tensors and tuples (:func:`rng_state`).

Format 1 (older fastclr) pickled numpy's RNG state as an ndarray; those files load too, with exactly
numpy's array-rebuilding globals allow-listed (they build arrays of plain dtypes and call nothing else).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from .config import FIXED, TrainConfig, default_of, leaf_fields
from .errors import FastclrError

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


class CheckpointWriteError(FastclrError):
    """A checkpoint could not be written; the previous one (if any) is untouched."""


@dataclasses.dataclass
class TrainState:
    """What the training loop carries from step to step and a checkpoint saves.

    ``epoch`` and ``batch`` name the next batch to train: (e, 0) after epoch e's last step.
    """

    step: int = 0                     # optimiser steps taken
    epoch: int = 0                    # current epoch, 0-based
    batch: int = 0                    # batches of ``epoch`` already trained
    losses: list = dataclasses.field(default_factory=list)        # every step's loss, as floats
    train_seconds: float = 0.0        # wall time in training steps (k-NN checks excluded)
    knn_history: list = dataclasses.field(default_factory=list)   # [{"step", "knn_accuracy", "seconds"}]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- RNG states as plain data

def rng_state() -> dict:
    """Python's, numpy's, torch's (and CUDA's) global RNG states as tensors and tuples of plain numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s output (format 2; format-1 files are not resumed)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- writing

def write_checkpoint(obj: dict, path: str | os.PathLike, save=None) -> None:
    """Write ``obj`` to ``path`` atomically; on failure remove the temporary file, raise CheckpointWriteError.

    ``save(obj, file)`` is the serialiser (default ``torch.save``; tests pass one that fails part-way)."""
    path, save = Path(path), save or torch.save
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:   # torch.save reports ENOSPC as RuntimeError("[enforce fail ...")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        previous = f"the previous checkpoint {path} is intact" if path.is_file() else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write a checkpoint to {path.parent}/ ({_reason(exc)}); "
                                   f"the run stops here and {previous}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "enforce fail" in text or "file write failed" in text or "unexpected pos" in text:
        return "write failed: is the disk full?"
    return text[:200]


# --------------------------------------------------------------------------- reading

def _numpy_array_globals() -> list:
    """numpy's globals for rebuilding a plain ndarray (format 1's RNG state): no callable beyond that."""
    core = getattr(np, "_core", None) or np.core
    dtype_classes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a fastclr checkpoint dict without executing code from the file.

    Raises FastclrError (one clear line) for a missing, truncated, foreign, newer or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise FastclrError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_global(exc)
        if unsafe is None:                       # not a pickle at all: garbage or a truncated file
            raise FastclrError(f"checkpoint {path} cannot be read (UnpicklingError); "
                               "it may be truncated: use an earlier one or retrain") from None
        raise FastclrError(f"refused to load {path}: it holds Python objects other than tensors and plain data "
                           f"(it names {unsafe}), and loading it could run code. fastclr writes no such "
                           "objects: do not use this file unless you know who made it") from None
    except Exception as exc:
        raise FastclrError(f"checkpoint {path} cannot be read ({type(exc).__name__}); "
                           "it may be truncated: use an earlier one or retrain") from None
    if not isinstance(ckpt, dict) or "encoder" not in ckpt or "encoder_hparams" not in ckpt:
        raise FastclrError(f"{path} is not a fastclr checkpoint")
    if ckpt.get("format", 0) not in READABLE_FORMATS:
        raise FastclrError(f"{path} has checkpoint format {ckpt.get('format')}, this fastclr reads formats "
                           f"{', '.join(map(str, READABLE_FORMATS))}; use the fastclr version that wrote it")
    return ckpt


def _unsafe_global(exc: BaseException) -> str | None:
    """The global that torch's weights-only unpickler refused ("... unsupported GLOBAL posix.system ..."),
    or None when the error is of another kind."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line:
            return line.split("GLOBAL", 1)[1].split()[0]
    return None


# --------------------------------------------------------------------------- the schema

def make_payload(cfg: TrainConfig, tr, loader_state: dict, state: TrainState) -> dict:
    """Everything a resume needs, as tensors and plain data (read back weights-only). ``tr``: the run's
    ``fastclr.train.Training``."""
    return {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(),
            "encoder_hparams": tr.model.encoder.hparams, "encoder": tr.model.encoder.state_dict(),
            "head": tr.model.head.state_dict(), "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(), "scaler": tr.scaler.state_dict(), "rng": rng_state(),
            "loader": loader_state, "state": state.to_dict()}


def encoder_state(ckpt: dict) -> tuple[dict, dict]:
    """The encoder's constructor arguments and its weights, from any readable format."""
    return dict(ckpt["encoder_hparams"]), ckpt["encoder"]


def restore_training(tr, ckpt: dict) -> None:
    """Load a checkpoint's weights and optimiser, schedule and scaler states into ``tr`` (a Training)."""
    tr.model.encoder.load_state_dict(ckpt["encoder"])
    tr.model.head.load_state_dict(ckpt["head"])
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.scheduler.load_state_dict(ckpt["scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])


def loop_state(ckpt: dict) -> tuple[TrainState, dict]:
    """The loop's TrainState and the data order's state; restores the global RNG states on the way."""
    set_rng_state(ckpt["rng"])
    return TrainState(**ckpt["state"]), ckpt["loader"]


def saved_config(ckpt: dict) -> dict:
    """The run's flat config as saved (``TrainConfig.to_dict``'s form; earlier files lack later settings)."""
    return dict(ckpt.get("config", {}))


def check_resume(saved: dict, cfg: TrainConfig) -> None:
    """FastclrError naming every FIXED setting whose value differs from the saved run's. A setting a file lacks
    was written before it existed: that run had its default."""
    now = cfg.to_dict()
    diff = [f.name for f in leaf_fields(type(cfg)) if f.metadata["resume"] == FIXED
            and _same(saved.get(f.name, default_of(f))) != _same(now[f.name])]
    if diff:
        pairs = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now[k]!r})" for k in diff)
        raise FastclrError(f"--resume needs the settings of the saved run: {pairs}")


def _same(v):
    return tuple(v) if isinstance(v, list) else v


def read_resume_checkpoint(path: str | os.PathLike, cfg: TrainConfig) -> dict:
    """The checkpoint --resume continues from, checked against ``cfg``; on the CPU (RNG states stay there)."""
    ckpt = read_checkpoint(path)
    if "state" not in ckpt:
        raise FastclrError(f"{path} was written by an older fastclr (checkpoint format {ckpt.get('format')}): its "
                           "encoder loads (fastclr.eval, load_encoder) but --resume needs format "
                           f"{CHECKPOINT_FORMAT}; start a new run")
    check_resume(saved_config(ckpt), cfg)
    return ckpt
