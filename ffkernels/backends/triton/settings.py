"""Switches and tile sizes of the Triton backend (host side; nothing here is compiled).

``fp32_precision`` is the ``input_precision`` of every fp32 ``tl.dot``: ``"ieee"`` (the default, exact
fp32 products like torch's own default matmul, and the only choice the interpreter tests use) or
``"tf32"`` (tensor cores on Ampere and newer: faster, ~1e-3 relative error, like
``torch.backends.cuda.matmul.allow_tf32 = True``). fp16/bf16 dots always use the tensor cores with
fp32 accumulation.
"""
from __future__ import annotations

import os

import torch

FP32_PRECISIONS = ("ieee", "tf32")
_fp32_precision = "ieee"


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1): kernels run on the CPU with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_fp32_precision(precision: str) -> None:
    """Choose the ``tl.dot`` input precision for fp32 tensors: "ieee" (exact, default) or "tf32"."""
    global _fp32_precision
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"ffkernels: unknown fp32 precision {precision!r}; expected one of "
                         f"{', '.join(map(repr, FP32_PRECISIONS))}")
    _fp32_precision = precision


def get_fp32_precision() -> str:
    return _fp32_precision


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` given to tl.dot for operands of ``dtype``."""
    return _fp32_precision if dtype == torch.float32 else "ieee"


def supported_dtypes() -> tuple:
    """fp32 under the interpreter (numpy has no bf16 and the tests are fp32); fp32/fp16/bf16 on GPUs."""
    if interpreting():
        return (torch.float32,)
    return (torch.float32, torch.float16, torch.bfloat16)


def block(n: int, hi: int) -> int:
    """A power-of-two tile edge covering ``n``, at least 16 (the smallest tl.dot edge) and at most ``hi``."""
    b = 16
    while b < n and b < hi:
        b *= 2
    return b


# Largest tile edges. The interpreter runs a program per tile in Python, so fewer, larger tiles are much
# faster there; on GPUs the edges bound registers/shared memory (fp32 tiles use twice the space of fp16).
# These are fixed, not autotuned: the fused step updates W in place, so autotuning it would need the
# parameters and optimizer state restored after every trial.
def max_tiles(dtype: torch.dtype) -> dict:
    if interpreting():
        return {"m": 128, "n": 128, "k": 128, "rows": 128}
    if dtype == torch.float32:
        return {"m": 64, "n": 64, "k": 32, "rows": 32}
    return {"m": 64, "n": 128, "k": 64, "rows": 64}


NUM_WARPS = 4
