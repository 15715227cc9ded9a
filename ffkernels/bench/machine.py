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


def parse_archs(text: str) -> list:
    """The compute capabilities of a TORCH_CUDA_ARCH_LIST-style string as "major.minor": "8.0;9.0+PTX" ->
    ["8.0", "9.0"]; also "8.0 9.0", "sm_90", "90", "9.0a" (the arch-specific variant of 9.0)."""
    out = []
    for item in text.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().lower().removesuffix("+ptx").removeprefix("sm_").removeprefix("compute_")
        if not item:
            continue
        if "." not in item and item.isdigit() and len(item) >= 2:
            item = f"{item[:-1]}.{item[-1]}"
        major, _, minor = item.partition(".")
        minor = minor.rstrip("af")
        if major.isdigit() and minor.isdigit():
            out.append(f"{int(major)}.{int(minor)}")
    return list(dict.fromkeys(out))


def extension_rebuild_reason(capability) -> "str | None":
    """Why ffkernels._C must be rebuilt for a GPU of compute capability ``capability`` ((major, minor) or
    "major.minor"), or None when the loaded build has CUDA kernels compiled for it."""
    cap = capability if isinstance(capability, str) else "%d.%d" % tuple(capability)
    if not _ext.loaded():
        return f"ffkernels._C is not built or does not load ({_ext.load_error()})"
    if not _ext.built_with_cuda():
        return "ffkernels._C was built without CUDA kernels"
    archs = parse_archs(_ext.cuda_archs())
    if cap not in archs:
        return (f"ffkernels._C has CUDA kernels for {', '.join(archs) or 'no arch'} "
                f"(cuda_archs {_ext.cuda_archs()!r}), not for this GPU's {cap}")
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
        "ffkernels_cuda_archs": _ext.cuda_archs(),
        "backends": available_backends(),
        "device": str(device),
        "gpu_name": None,
        "gpu_memory_bytes": None,
        "gpu_capability": None,
        "fp32_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cap = f"{props.major}.{props.minor}"
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, gpu_capability=cap,
                    cuda_build_reason=extension_rebuild_reason(cap))
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
