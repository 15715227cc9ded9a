"""Peak memory of training, above what the process held just before the model was built.

Two measures; ``methods(device)`` says in words which ones a result carries:

- allocator level (tensor bytes, exact), on both devices:
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the start (no CUDA context, no caching-allocator reserve).
  CPU: ``torch.profiler`` with ``profile_memory=True`` around building the model and a few steps; the
  maximum of the running sum of the CPU allocator's allocation (+) and free (-) events.
- process level, CPU only: the resident-set high-water mark (``VmHWM`` in /proc/self/status, reset
  to the current RSS by writing 5 to /proc/self/clear_refs at the start) minus the RSS at the start.
  RSS also sees what is not a tensor (BLAS buffers, allocator slack and fragmentation), so each
  configuration must run in a fresh process to own its high-water mark (network.py does that).
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

CUDA_ALLOC = ("CUDA allocator peak over building the model and {steps} training steps: "
              "torch.cuda.max_memory_allocated() minus memory_allocated() just before the model is built "
              "(tensor bytes; no CUDA context, no allocator reserve)")
CPU_ALLOC = ("CPU allocator peak: torch.profiler(profile_memory=True) around building the model and "
             "{steps} training steps; maximum of the running sum of allocations minus frees (tensor bytes)")
CPU_RSS = ("peak RSS of a fresh subprocess per configuration over building the model and {steps} training steps: "
           "VmHWM (reset via /proc/self/clear_refs just before the model is built) minus the RSS at that moment "
           "(includes allocator slack and library buffers)")

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def methods(device, steps: int) -> dict:
    """{"alloc": how the allocator-level peak is measured, "rss": how the RSS peak is (None on CUDA)}."""
    if torch.device(device).type == "cuda":
        return {"alloc": CUDA_ALLOC.format(steps=steps), "rss": None}
    return {"alloc": CPU_ALLOC.format(steps=steps), "rss": CPU_RSS.format(steps=steps)}


def _status_bytes(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split(":", 1)[1].split()
                if unit != "kB":
                    raise RuntimeError(f"ffkernels bench: unexpected unit {unit!r} for {field} in {_STATUS}")
                return int(value) * 1024
    raise RuntimeError(f"ffkernels bench: {_STATUS} has no {field} line")


def rss_unavailable_reason():
    """Why the peak-RSS measure cannot work here, or None when it can (this also resets VmHWM)."""
    try:
        _status_bytes("VmHWM")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except (OSError, RuntimeError) as e:
        return f"peak RSS needs Linux's /proc/self/status and a writable /proc/self/clear_refs ({e})"
    return None


class PeakRSS:
    """CPU: ``start()`` resets the RSS high-water mark; ``peak_bytes()`` is the peak since, above the start."""

    def __init__(self):
        self._baseline = None

    def start(self) -> None:
        gc.collect()
        reason = rss_unavailable_reason()
        if reason:
            raise RuntimeError(f"ffkernels bench: cannot measure CPU memory: {reason}")
        self._baseline = _status_bytes("VmRSS")

    def peak_bytes(self) -> int:
        if self._baseline is None:
            raise RuntimeError("ffkernels bench: PeakRSS.peak_bytes() called before start()")
        return _status_bytes("VmHWM") - self._baseline


class CudaPeak:
    """CUDA: the caching allocator's peak since ``start()``, above what was allocated at the start."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._baseline = None

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self._baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        if self._baseline is None:
            raise RuntimeError("ffkernels bench: CudaPeak.peak_bytes() called before start()")
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self._baseline


def cpu_allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn()`` (and not yet freed), from the profiler's
    allocation events. Memory freed during ``fn`` that was allocated before it is not seen: free it first."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        raise RuntimeError("ffkernels bench: this torch's profiler exposes no kineto_results; the CPU "
                           "allocator-level memory measure needs it")
    events = sorted((e for e in results.events() if e.name() == "[memory]" and e.device_type() ==
                     torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak
