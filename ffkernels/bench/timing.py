"""Timing step functions: warm-up, then repeats; median and spread.

Each repeat times ``number`` back-to-back calls and reports the time per call. ``number`` is chosen
once, after the warm-up, so that one repeat lasts at least ``min_time`` seconds (like ``timeit``):
short steps are not drowned in timer and launch noise, long steps run once per repeat.
``measure_many`` interleaves the repeats of several steps (repeat 1 of each, then repeat 2 of each,
...), so that a machine whose load drifts slows them alike and their ratios stay meaningful.
On CUDA the time is taken with CUDA events around the calls and the device is synchronized before
reading it; on the CPU with ``time.perf_counter``.

A step that raises (CUDA out of memory, a Triton compile error, a missing kernel) stops the benchmark only
when no ``errors`` dict is given: with one, ``measure_many`` records the error under the step's name, drops
that step and times the others.
"""
from __future__ import annotations

import gc
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


def describe_error(e: BaseException) -> str:
    """One line for a result: the exception's type and the first line of its message (at most 300 characters)."""
    text = str(e).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def release_memory(device) -> None:
    """Free what dropped steps held: Python garbage, then (CUDA) the caching allocator's unused blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a context broken by an earlier error: nothing more to free
            pass


def measure_many(fns: dict, device, *, warmup: int = 3, repeats: int = 10, min_time: float = 0.0,
                 errors: "dict | None" = None) -> dict:
    """{name: Timing} for every step in ``fns`` ({name: no-argument callable}), their repeats interleaved.

    ``errors`` None: an exception of a step propagates. A dict: it gets ``{name: describe_error(e)}`` for every
    step that raised (in its warm-up or any repeat); that step is deleted from ``fns`` (so that what it holds,
    e.g. GPU memory, can be freed) and the others are still timed; the result has no entry for it.
    """
    _check_counts(warmup, repeats, min_time)
    device = torch.device(device)
    if errors is None:
        fns = dict(fns)

    def guarded(name, action):
        if errors is None:
            return action()
        try:
            return action()
        except Exception as e:  # noqa: BLE001 (recorded for the report; the other steps go on)
            errors[name] = describe_error(e)
            del fns[name]
            release_memory(device)
            return None

    def warm_up(fn):
        for _ in range(warmup):
            fn()
        synchronize(device)
        return _run_once(fn, 1, device) if min_time > 0 else None

    numbers = {}
    for name, fn in list(fns.items()):
        one = guarded(name, lambda: warm_up(fn))
        if name in fns:
            numbers[name] = max(1, math.ceil(min_time / max(one, 1e-9))) if min_time > 0 else 1
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in list(fns.items()):
            t = guarded(name, lambda: _run_once(fn, numbers[name], device))
            if name in fns:
                times[name].append(t)
    clock = "cuda-event" if device.type == "cuda" else "perf_counter"
    return {name: Timing(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), repeats=repeats,
                         number=numbers[name], clock=clock) for name, ts in times.items() if name in fns}


def measure(fn: Callable[[], object], device, *, warmup: int = 3, repeats: int = 10,
            min_time: float = 0.0) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then ``repeats`` timed repeats."""
    return measure_many({"step": fn}, device, warmup=warmup, repeats=repeats, min_time=min_time)["step"]
