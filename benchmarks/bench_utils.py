"""Shared by the benchmarks: the machine's name, medians of timed runs, the matmul peak."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = REPO.parent / "shared" / "data"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    return (f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def median_seconds(fn: Callable[..., object], repeats: int, warmup: int = 0,
                   setup: Callable[[], object] | None = None) -> float:
    """Median wall time of repeats calls of fn, after warmup untimed calls. With setup, each
    timed call is fn(setup()), setup's own time left out (a fresh object, a cold cache)."""
    for _ in range(warmup):
        fn() if setup is None else fn(setup())
    times = []
    for _ in range(repeats):
        args = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: list, repeats: int, warmup: int = 3, rounds: int = 3) -> list[float]:
    """Median seconds of each function. The functions take turns in rounds (all of a's
    runs, then all of b's, then a's again, ...), each round starting with one untimed run, so
    that a change in the machine's load hits them alike while each runs warm."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for fn, record in zip(fns, times, strict=True):
            fn()
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def synchronized(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn, made to return only when the device is done: a GPU runs its work asynchronously."""
    import torch

    if not str(device).startswith("cuda"):
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def matmul_peak(dtype, size: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """FLOP/s of a large square matmul: the ceiling for model FLOPs utilisation."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    return 2 * size**3 / median_seconds(synchronized(lambda: a @ b, device), repeats, warmup=3)


def memory_bandwidth(megabytes: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s of a streaming read (summing a large float32 tensor): the ceiling for work that
    must read every weight once per step, like decoding one token."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4, device=device)
    return x.numel() * 4 / median_seconds(synchronized(x.sum, device), repeats, warmup=1)
