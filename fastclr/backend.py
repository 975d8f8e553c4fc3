"""The one place that decides device, precision, compilation and evaluation backends.

Every other module receives a :class:`Runtime` (or a backend name resolved here) and never
probes CUDA or imports cuML on its own. Probes are cached; each choice can be overridden by an
argument (CLI flag) or an environment variable:

=====================  ===========================  =======================================
choice                 environment variable         values
=====================  ===========================  =======================================
device                 ``FASTCLR_DEVICE``           auto, cpu, cuda
k-NN backend           ``FASTCLR_KNN_BACKEND``      auto, cuml, torch, sklearn
t-SNE backend          ``FASTCLR_TSNE_BACKEND``     auto, cuml, sklearn
linear-probe backend   ``FASTCLR_PROBE_BACKEND``    auto, torch, sklearn
CPU kernels            ``FASTCLR_CPU_KERNELS``      1 (default: where they build), 0
=====================  ===========================  =======================================
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from dataclasses import dataclass

import torch

from .errors import FastclrError  # noqa: F401  (re-exported: fastclr.backend.FastclrError still imports)

KNN_BACKENDS = ("cuml", "torch", "sklearn")
TSNE_BACKENDS = ("cuml", "sklearn")
PROBE_BACKENDS = ("torch", "sklearn")


# --------------------------------------------------------------------------- probes (cached)

@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def cuml_available() -> bool:
    """cuML is importable *and* a CUDA device is there to run it."""
    if not cuda_available():
        return False
    try:
        importlib.import_module("cuml")
    except Exception:  # a broken cuML install is as good as none
        return False
    return True


@functools.lru_cache(maxsize=None)
def compile_available() -> bool:
    """torch.compile needs a working Inductor backend (a C++ compiler on CPU, Triton on CUDA)."""
    if sys.platform == "win32" or not hasattr(torch, "compile"):
        return False
    try:
        fn = torch.compile(lambda x: x * 2 + 1, dynamic=False)
        return bool(torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 / AMX); elsewhere bf16 is emulated
    and several times slower than fp32 (docs/design.md, "Measurements behind the code")."""
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False
    if caps not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def fused_adamw_available(device_type: str) -> bool:
    """Whether ``AdamW(fused=True)`` runs on this device type (CUDA; CPU from torch 2.4). One kernel updates
    every parameter instead of a dozen small ops per tensor (docs/design.md, "Measurements behind the
    code")."""
    try:
        p = torch.zeros(2, device=device_type, requires_grad=True)
        p.grad = torch.ones(2, device=device_type)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except Exception:
        return False


def clear_probe_cache() -> None:
    """Forget cached probes (tests use this after patching the environment)."""
    for probe in (cuda_available, cuml_available, compile_available, cpu_has_native_bf16, fused_adamw_available):
        probe.cache_clear()


# --------------------------------------------------------------------------- resolution

def _choice(value: str | None, env: str, allowed: tuple[str, ...]) -> str:
    choice = (value if value not in (None, "") else os.environ.get(env, "auto")).lower()
    if choice not in ("auto",) + allowed:
        raise FastclrError(f"{env.split('FASTCLR_')[-1].lower()} backend {choice!r} is unknown; "
                           f"choose one of: auto, {', '.join(allowed)}")
    return choice


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' -> cuda when present, else cpu. Asking for cuda without one is an error, not a fallback."""
    choice = _choice(device, "FASTCLR_DEVICE", ("cpu", "cuda"))
    if choice == "cuda" and not cuda_available():
        raise FastclrError("--device cuda was asked for, but PyTorch sees no CUDA device; "
                           "use --device cpu (or auto)")
    if choice == "auto":
        choice = "cuda" if cuda_available() else "cpu"
    return torch.device(choice)


def resolve_knn_backend(backend: str | None = None, device: torch.device | None = None) -> str:
    """auto -> cuML where usable, else torch (chunked matmul + topk; on CPU it measured ~3x faster
    than scikit-learn's brute force at 10k x 60k x 128, see benchmarks/bench_knn.py)."""
    choice = _choice(backend, "FASTCLR_KNN_BACKEND", KNN_BACKENDS)
    if choice == "cuml" and not cuml_available():
        raise FastclrError("k-NN backend 'cuml' needs cuML and a CUDA device: "
                           "pip install 'fastclr[gpu]' on a GPU machine, or use --knn-backend torch")
    if choice == "auto":
        device = device or resolve_device()
        choice = "cuml" if (device.type == "cuda" and cuml_available()) else "torch"
    return choice


def resolve_tsne_backend(backend: str | None = None, device: torch.device | None = None) -> str:
    """auto -> cuML's FFT t-SNE where usable, else scikit-learn (openTSNE was no faster on 2 cores)."""
    choice = _choice(backend, "FASTCLR_TSNE_BACKEND", TSNE_BACKENDS)
    if choice == "cuml" and not cuml_available():
        raise FastclrError("t-SNE backend 'cuml' needs cuML and a CUDA device; use --tsne-backend sklearn")
    if choice == "auto":
        device = device or resolve_device()
        choice = "cuml" if (device.type == "cuda" and cuml_available()) else "sklearn"
    return choice


def resolve_probe_backend(backend: str | None = None) -> str:
    """auto -> torch: full-batch L-BFGS on standardised features, on whatever device holds them."""
    choice = _choice(backend, "FASTCLR_PROBE_BACKEND", PROBE_BACKENDS)
    return "torch" if choice == "auto" else choice


def resolve_amp_dtype(amp: bool, device: torch.device) -> tuple[torch.dtype | None, str]:
    """Pick the autocast dtype for ``--amp``; returns ``(dtype or None, reason)``.

    CUDA: bf16 where the GPU supports it (no loss scaling needed), else fp16 with a GradScaler.
    CPU: bf16 only where the CPU computes it natively; elsewhere it is several times slower than fp32.
    """
    if not amp:
        return None, "fp32 (--no-amp)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "cuda bf16 autocast"
        return torch.float16, "cuda fp16 autocast + GradScaler"
    if cpu_has_native_bf16():
        return torch.bfloat16, "cpu bf16 autocast (native bf16 instructions)"
    return None, ("fp32: this CPU has no native bf16 instructions, where bf16 runs several times slower "
                  "than fp32")


# --------------------------------------------------------------------------- the decision object

@dataclass(frozen=True)
class Runtime:
    """Everything decided about where and how to run, made once by :func:`make_runtime`."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: no autocast
    amp_note: str
    compile: bool
    knn_backend: str
    tsne_backend: str
    probe_backend: str
    fused_optimizer: bool = False  # AdamW(fused=True)
    compile_mode: str = "default"  # torch.compile's mode where ``compile``
    cpu_kernels: bool = False      # fastclr.kernels for the encoders' pool/ReLU (and the tutorial's first block)

    def autocast(self):
        """Autocast context for the forward pass; a no-op where AMP is off."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def describe(self) -> dict:
        return {
            "device": str(self.device),
            "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else "cpu"),
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "amp_note": self.amp_note,
            "compile": self.compile,
            "compile_mode": self.compile_mode if self.compile else None,
            "knn_backend": self.knn_backend,
            "tsne_backend": self.tsne_backend,
            "probe_backend": self.probe_backend,
            "fused_optimizer": self.fused_optimizer,
            "cpu_kernels": self.cpu_kernels,
        }

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under torch.compile in this runtime's mode, or itself where compile is off."""
        return torch.compile(module, mode=self.compile_mode) if self.compile else module

    def optimizer(self, params, lr: float, weight_decay: float, capturable: bool = False) -> torch.optim.AdamW:
        """AdamW, fused where this device supports it. ``capturable``: safe to capture in a CUDA graph (step
        counts on the device, the learning rate a device tensor that fastclr.capture advances); on the CPU, where
        there are no graphs, the same tensor learning rate with the single-tensor update."""
        extra = {"fused": True} if self.fused_optimizer else {}
        if capturable:
            lr = torch.tensor(lr, dtype=torch.float32, device=self.device)
            extra.update(capturable=True) if self.device.type == "cuda" else extra.update(foreach=False)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **extra)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc mallopt() parameters
# the mmap thresholds tried in turn: glibc versions that cap it at half their 64 MiB heap size refuse the first
_MMAP_THRESHOLDS = (256 << 20, 32 << 20)


@functools.lru_cache(maxsize=None)
def keep_cpu_memory_mapped() -> bool:
    """Stop glibc returning freed activation memory to the OS between training steps (Linux/glibc only).

    Why it is faster: a CPU step allocates and frees multi-MB activations (the tutorial net's first conv
    output is 6.4 MB at batch 128; the cnn's on 3 x 32 x 32 colour views in f32 is 32 MiB); by default glibc
    serves them with fresh mmap()s or trims them off the heap when freed, so every step page-faults its
    activations in again. With the mmap threshold at 256 MiB (32 MiB where glibc refuses more: at 32 MiB the
    colour step still faulted ~8,000 pages in) and trimming above 512 MB they stay in the heap (timings:
    docs/design.md, "Measurements behind the code"). The cost: the process keeps up to 512 MB of freed memory.
    ``FASTCLR_MALLOC_TUNING=0`` switches it off. Returns whether it is on.
    """
    if os.environ.get("FASTCLR_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mapped = any(libc.mallopt(_M_MMAP_THRESHOLD, size) for size in _MMAP_THRESHOLDS)
        return mapped and bool(libc.mallopt(_M_TRIM_THRESHOLD, 512 << 20))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        return False


def set_deterministic(on: bool) -> None:
    """PyTorch's deterministic algorithms (with cuBLAS's fixed workspace); warn-only, so an op that has no
    deterministic CUDA kernel (scatter_add_ in the k-NN vote) warns instead of stopping the run."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on, warn_only=True)


def resolve_cpu_kernels(device: torch.device) -> bool:
    """fastclr.kernels on a CPU device, unless ``FASTCLR_CPU_KERNELS=0`` or they cannot be built here (no C
    compiler, not Linux: a warning, then PyTorch's layers). The first call on a machine compiles them (~1 s)."""
    if device.type != "cpu" or os.environ.get("FASTCLR_CPU_KERNELS", "1") == "0":
        return False
    from . import kernels

    return kernels.available()


def make_runtime(device: str | None = "auto", amp: bool = False, compile: bool = False,
                 knn_backend: str | None = None, tsne_backend: str | None = None,
                 probe_backend: str | None = None, deterministic: bool = False,
                 compile_mode: str = "default") -> Runtime:
    if deterministic:
        set_deterministic(True)
    dev = resolve_device(device)
    amp_dtype, note = resolve_amp_dtype(amp, dev)
    if dev.type == "cpu":
        keep_cpu_memory_mapped()
    use_compile = bool(compile)
    if use_compile and not compile_available():
        import warnings
        warnings.warn("--compile asked for but torch.compile is not usable here; running eager")
        use_compile = False
    return Runtime(
        device=dev, amp_dtype=amp_dtype, amp_note=note, compile=use_compile, compile_mode=compile_mode,
        knn_backend=resolve_knn_backend(knn_backend, dev),
        tsne_backend=resolve_tsne_backend(tsne_backend, dev),
        probe_backend=resolve_probe_backend(probe_backend),
        fused_optimizer=fused_adamw_available(dev.type),
        # the kernels are torch.library ops: torch.compile keeps each as one op in its graph
        cpu_kernels=resolve_cpu_kernels(dev),
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device``: CUDA's free memory, or the host's available memory (MemAvailable) for the CPU;
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timers must call this before reading the clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
