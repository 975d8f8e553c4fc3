"""Shared helpers for the benchmark suites (pytest-benchmark).

Each suite is parametrised over backend/impl and size, and groups its cases so that one table compares
them. CUDA cases are skipped without a GPU; CUDA timings synchronise inside the timed function.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

torch.set_num_threads(min(int(os.environ.get("FASTCLR_BENCH_THREADS", "2")), torch.get_num_threads()))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
QUICK = os.environ.get("FASTCLR_BENCH_QUICK") == "1"   # the smoke test: smallest size, one round


def pytest_benchmark_update_machine_info(config, machine_info):
    """The GPU, where there is one, beside pytest-benchmark's CPU description (the report names both)."""
    if torch.cuda.is_available():
        machine_info["cuda_device"] = torch.cuda.get_device_name()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device, rounds=5, warmup=1):
    """Time ``fn`` with device sync inside the timed call; warm-up rounds absorb compilation and caches."""
    def timed():
        out = fn()
        sync(device)
        return out
    if QUICK:
        rounds, warmup = 1, 0
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)


def cpu_peak_mib(setup: str, stmt: str) -> float:
    """Peak resident memory added by ``stmt`` after ``setup``, measured in a fresh process.

    Reads VmHWM (the high-water mark of this address space), not ru_maxrss: on Linux ru_maxrss survives
    fork+exec, so a child of a big pytest process would start at its parent's peak and report 0."""
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(2)
        def hwm():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
        {setup}
        base = hwm()
        {stmt}
        print(hwm() - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def describe(benchmark, case: str, baseline: bool = False) -> None:
    """Name the case for the report (``case``: what a reader sees on the bar) and mark the group's baseline,
    the row every other row's speed-up is measured against."""
    benchmark.extra_info["case"] = case
    if baseline:
        benchmark.extra_info["baseline"] = True


def skip_unless_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
