"""Timing step functions: warm-up, then repeats; median and spread.

Each repeat times ``number`` back-to-back calls and reports the time per call. ``number`` is chosen
once, after the warm-up, so that one repeat lasts at least ``min_time`` seconds (like ``timeit``):
short steps are not drowned in timer and launch noise, long steps run once per repeat.
``measure_many`` interleaves the repeats of several steps (repeat 1 of each, then repeat 2 of each,
...), so that a machine whose load drifts slows them alike and their ratios stay meaningful.
On CUDA the time is taken with CUDA events around the calls and the device is synchronized before
reading it; on the CPU with ``time.perf_counter``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median, fastest and slowest of ``repeats`` repeats of ``number`` calls."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int
    clock: str  # "cuda-event" or "perf_counter"

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(median_ms=self.median_s * 1e3, min_ms=self.min_s * 1e3, max_ms=self.max_s * 1e3)
        return d


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_counts(warmup: int, repeats: int, min_time: float) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"ffkernels bench: warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"ffkernels bench: repeats must be an int >= 1, got {repeats!r}")
    if not (isinstance(min_time, (int, float)) and math.isfinite(min_time) and min_time >= 0):
        raise ValueError(f"ffkernels bench: min_time must be a finite number >= 0, got {min_time!r}")


def _run_once(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``number`` back-to-back calls of ``fn``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure_many(fns: dict, device, *, warmup: int = 3, repeats: int = 10, min_time: float = 0.0) -> dict:
    """{name: Timing} for every step in ``fns`` ({name: no-argument callable}), their repeats interleaved."""
    _check_counts(warmup, repeats, min_time)
    device = torch.device(device)
    numbers = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        numbers[name] = 1
        if min_time > 0:
            one = _run_once(fn, 1, device)
            numbers[name] = max(1, math.ceil(min_time / max(one, 1e-9)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_run_once(fn, numbers[name], device))
    clock = "cuda-event" if device.type == "cuda" else "perf_counter"
    return {name: Timing(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), repeats=repeats,
                         number=numbers[name], clock=clock) for name, ts in times.items()}


def measure(fn: Callable[[], object], device, *, warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then ``repeats`` timed repeats."""
    return measure_many({"step": fn}, device, warmup=warmup, repeats=repeats, min_time=min_time)["step"]
