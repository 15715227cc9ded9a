"""Small result and error types shared across ffkernels (kept free of imports to avoid cycles)."""
from typing import NamedTuple

import torch


def dtype_name(dtype) -> str:
    """'float32' for torch.float32: how error messages name a dtype."""
    return str(dtype).replace("torch.", "")


class FFStepOutput(NamedTuple):
    """What one FF layer step returns; everything computed with the weights *before* the update."""

    loss: torch.Tensor   # 0-d
    h_pos: torch.Tensor  # (B, out_features)
    h_neg: torch.Tensor  # (B, out_features)
    g_pos: torch.Tensor  # (B,)
    g_neg: torch.Tensor  # (B,)


class FFGradOutput(NamedTuple):
    """The local gradient of one FF layer (no update applied), e.g. for data-parallel all-reduce."""

    loss: torch.Tensor
    h_pos: torch.Tensor
    h_neg: torch.Tensor
    g_pos: torch.Tensor
    g_neg: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: "torch.Tensor | None"


class NonFiniteLossError(FloatingPointError):
    """An FF step's loss was NaN or infinite; the weights and optimizer state were left unchanged."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, Triton without a GPU or interpreter...)."""


class ConvGeometry(NamedTuple):
    """How an FFConv2d convolves (nn.Conv2d's arguments): each of stride, padding, dilation a pair (h, w)."""

    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
