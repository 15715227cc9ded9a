"""Peak memory of a piece of work, above what the process held just before it started.

- CUDA: the caching allocator's peak, ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start (tensor bytes; the CUDA
  context and the allocator's unused reserve are not counted).
- CPU: the process's resident-set high-water mark (``VmHWM`` in /proc/self/status, reset to the
  current RSS by writing 5 to /proc/self/clear_refs at the start) minus its RSS at the start. RSS
  sees every allocation, torch's or not (BLAS buffers, thread stacks, allocator slack), so each
  configuration should run in a fresh process (see network.py) to own its high-water mark.
"""
from __future__ import annotations

import gc

import torch

CUDA_METHOD = ("CUDA allocator peak: torch.cuda.max_memory_allocated() minus memory_allocated() just before "
               "the model is built (tensor bytes; no CUDA context, no allocator reserve)")
CPU_METHOD = ("peak RSS of a fresh subprocess per configuration: VmHWM (reset via /proc/self/clear_refs just "
              "before the model is built) minus the RSS at that moment")

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                value, unit = line.split(":", 1)[1].split()
                if unit != "kB":
                    raise RuntimeError(f"ffkernels bench: unexpected unit {unit!r} for {field} in {_STATUS}")
                return int(value) * 1024
    raise RuntimeError(f"ffkernels bench: {_STATUS} has no {field} line")


def cpu_unavailable_reason():
    """Why the CPU peak-RSS measure cannot work here, or None when it can."""
    try:
        _status_bytes("VmHWM")
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except (OSError, RuntimeError) as e:
        return f"peak RSS needs Linux's /proc/self/status and a writable /proc/self/clear_refs ({e})"
    return None


class PeakMemory:
    """``start()`` takes the baseline; ``peak_bytes()`` is the peak since then, above that baseline."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.method = CUDA_METHOD if self.device.type == "cuda" else CPU_METHOD
        self._baseline = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        reason = cpu_unavailable_reason()  # this also resets VmHWM to the current RSS
        if reason:
            raise RuntimeError(f"ffkernels bench: cannot measure CPU memory: {reason}")
        self._baseline = _status_bytes("VmRSS")

    def peak_bytes(self) -> int:
        if self._baseline is None:
            raise RuntimeError("ffkernels bench: PeakMemory.peak_bytes() called before start()")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._baseline
        return _status_bytes("VmHWM") - self._baseline
