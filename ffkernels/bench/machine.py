"""What machine a benchmark ran on: recorded with every result so numbers can be compared honestly."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch

from .. import __version__
from ..backends import compiled as _ext
from ..backends import available_backends


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _package_version(name: str):
    """Installed version of a distribution, read without importing it (importing triton is slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device) -> dict:
    """CPU, threads, GPU (when ``device`` is CUDA), library versions and the backends built here."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "mkl": torch.backends.mkl.is_available(),
        "triton": _package_version("triton"),
        "ffkernels": __version__,
        "ffkernels_built_with_cuda": _ext.loaded() and _ext.built_with_cuda(),
        "backends": available_backends(),
        "device": str(device),
        "gpu_name": None,
        "gpu_memory_bytes": None,
        "gpu_capability": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory,
                    gpu_capability=f"{props.major}.{props.minor}")
    return info


def describe(info: dict) -> str:
    """One line for people: CPU, threads and (when used) the GPU."""
    n = info["torch_threads"]
    line = f"{info['cpu_model']} ({info['cpu_capability']}), {n} torch thread{'' if n == 1 else 's'}"
    if info.get("gpu_name"):
        line += f", GPU {info['gpu_name']}"
    line += f"; torch {info['torch']}"
    if info.get("triton"):
        line += f", triton {info['triton']}"
    return line
