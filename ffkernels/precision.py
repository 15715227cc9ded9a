"""Training precision of the commands (``--precision``): fp32, or bf16 = torch.autocast(dtype=torch.bfloat16) around
the training loop, with fp32 master weights and optimizer state (docs/design.md, "Mixed precision")."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"ffkernels: unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return precision


def precision_context(precision: str, device):
    """The context a run of ``precision`` trains in: torch.autocast(bf16) on the device's type, or nothing.

    Without autocast's weight cache: it keeps the cast of each leaf parameter for the whole region, and a run's
    region holds whole epochs of in-place updates (the FF steps', and torch.optim's for BP), so cached casts would
    be the weights of their first use."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)
