"""Wall time and peak memory of one stage, measured in this process.

CPU: peak resident set size above the stage's starting RSS, sampled every 2 ms from
/proc/self/statm by a background thread (torch's CPU allocations bypass tracemalloc,
and ru_maxrss cannot be reset between stages). Before each stage, freed heap memory is
handed back to the OS (glibc ``malloc_trim``) so that a stage reusing an earlier stage's
freed pages still shows up as growth. CUDA: torch's peak allocated bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _release_free_heap() -> None:
    if hasattr(_LIBC, "malloc_trim"):  # glibc only; elsewhere the baseline is merely looser
        _LIBC.malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


@dataclass
class Stage:
    seconds: float  # median over the repetitions
    peak_mb: float  # largest over the repetitions
    result: Any = None  # of the last repetition
    runs: tuple[float, ...] = ()  # every repetition's seconds


def measure_repeated(fn: Callable[[], Any], device: torch.device, repeats: int) -> Stage:
    """``fn`` timed ``repeats`` times: median seconds (and every run), largest peak memory."""
    stages = [measure(fn, device) for _ in range(repeats)]
    seconds = tuple(s.seconds for s in stages)
    return Stage(float(np.median(seconds)), max(s.peak_mb for s in stages), stages[-1].result, seconds)


def combined(*stages: Stage) -> Stage:
    """Stages run one after the other (e.g. trunk features, then the head's fit): runs
    summed repetition by repetition (a stage timed once counts in every repetition)."""
    n = max(len(s.runs) for s in stages) or 1
    runs = tuple(sum(s.runs[i] if len(s.runs) == n else s.seconds for s in stages) for i in range(n))
    return Stage(float(np.median(runs)), max(s.peak_mb for s in stages), stages[-1].result, runs)


def measure(fn: Callable[[], Any], device: torch.device) -> Stage:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
        return Stage(seconds, peak / 2**20, result, (seconds,))

    _release_free_heap()
    start_bytes = _rss_bytes()
    peak = [start_bytes]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return Stage(seconds, (peak[0] - start_bytes) / 2**20, result, (seconds,))


def agreement(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Pearson correlation of two influence matrices (upper triangle with diagonal) and
    the least-squares scale of ``scores`` onto ``reference`` (1 = same units)."""
    rows, cols = np.triu_indices(min(scores.shape), m=scores.shape[1])
    a, b = scores[rows, cols].astype(np.float64), reference[rows, cols].astype(np.float64)
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "scale": float(a @ b / (b @ b)),
    }
