"""``ffkernels info``: how this ffkernels was built and which backends can run here."""
from __future__ import annotations

import importlib.util
import json
import platform

import torch

from . import __version__
from .backends import BACKEND_NAMES, BACKENDS
from .backends import compiled as _ext


def cpu_bf16() -> str:
    """Whether this CPU has bf16 units for oneDNN's bf16 GEMMs (--precision bf16 on the cpu backend; without them
    ATen emulates bf16 and autocast is slower than fp32)."""
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN
        return "unknown (torch has no oneDNN)"
    return ("yes (oneDNN bf16 GEMMs: --precision bf16 / torch.autocast on the cpu backend)" if ok
            else "no (bf16 would be emulated, slower than fp32: keep --precision fp32)")


def gemm_dtypes() -> dict:
    """Per backend, the GEMM dtypes its FF steps run under torch.autocast (besides the parameters' own)."""
    return {n: [g for g in getattr(BACKENDS[n], "gemm_dtypes", ("param",)) if g != "param"] or "none"
            for n in BACKEND_NAMES}


def collect() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    triton = None
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version

        triton = version("triton")
    return {
        "ffkernels": __version__,
        "torch": torch.__version__,
        "triton": triton,
        "python": platform.python_version(),
        "extension": ("loaded" if _ext.loaded() else f"not loaded: {_ext.load_error()}"),
        "built_with_cuda": _ext.built_with_cuda(),
        "cuda_archs": _ext.cuda_archs() or None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": cpu_bf16(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "backends": {n: BACKENDS[n].unavailable_reason() or "available" for n in BACKEND_NAMES},
        "autocast_gemm_dtypes": gemm_dtypes(),
    }


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return info
    for k, v in info.items():
        if k in ("backends", "autocast_gemm_dtypes"):
            print(f"{k}:")
            for name, state in v.items():
                print(f"  {name:10s} {', '.join(state) if isinstance(state, list) else state}")
        else:
            print(f"{k}: {v}")
    return info
