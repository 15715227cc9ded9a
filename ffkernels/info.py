"""``ffkernels info``: how this ffkernels was built and which backends can run here."""
from __future__ import annotations

import importlib.util
import json
import platform

import torch

from . import __version__
from .backends import BACKEND_NAMES, BACKENDS
from .backends import compiled as _ext


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
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "backends": {n: BACKENDS[n].unavailable_reason() or "available" for n in BACKEND_NAMES},
    }


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return info
    for k, v in info.items():
        if k == "backends":
            print("backends:")
            for name, state in v.items():
                print(f"  {name:10s} {state}")
        else:
            print(f"{k}: {v}")
    return info
