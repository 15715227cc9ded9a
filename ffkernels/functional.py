"""Functional FF ops on plain tensors: checks the inputs, then runs one backend.

The module API (FFLinear, FFNet) is built on these; they are public for users who keep their own
parameters and state (e.g. data-parallel training: ``ff_grad`` -> all-reduce -> ``ff_update``).
"""
from __future__ import annotations

import torch

from ._types import FFGradOutput, FFStepOutput, dtype_name as _name
from .backends import get_backend, resolve_backend
from .config import FFConfig


def check_ff_inputs(x_pos, x_neg, weight: torch.Tensor, bias=None) -> None:
    """Raise a clear exception unless x_pos, x_neg are (B, in_features) tensors matching weight/bias."""
    for nm, x in (("x_pos", x_pos), ("x_neg", x_neg)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ffkernels: {nm} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"ffkernels: {nm} must be 2-D (B, in_features), got shape {tuple(x.shape)}")
        if x.shape[1] != weight.shape[1]:
            raise ValueError(f"ffkernels: {nm} has {x.shape[1]} features but the layer takes "
                             f"in_features={weight.shape[1]}")
        if x.device != weight.device:
            raise ValueError(f"ffkernels: {nm} is on {x.device} but the layer's weight is on {weight.device}")
        if x.dtype != weight.dtype:
            raise TypeError(f"ffkernels: {nm} has dtype {_name(x.dtype)} but the layer's weight is "
                            f"{_name(weight.dtype)}; convert one of them (e.g. x.to(layer.weight.dtype))")
    if x_pos.shape[0] != x_neg.shape[0]:
        raise ValueError(f"ffkernels: x_pos and x_neg must have the same batch size, got {x_pos.shape[0]} "
                         f"and {x_neg.shape[0]}")
    if x_pos.shape[0] == 0:
        raise ValueError("ffkernels: the batch is empty (B = 0)")
    if not weight.is_floating_point():
        raise TypeError(f"ffkernels: weight must be floating point, got {_name(weight.dtype)}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype
                             or bias.device != weight.device):
        raise ValueError(f"ffkernels: bias must be a ({weight.shape[0]},) {_name(weight.dtype)} tensor on "
                         f"{weight.device}, got {tuple(bias.shape)} {_name(bias.dtype)} on {bias.device}")


def _backend(backend: str, weight: torch.Tensor):
    return get_backend(resolve_backend(backend, weight.device, weight.dtype))


def ff_grad(x_pos, x_neg, weight, bias=None, config: FFConfig = FFConfig(), *, backend="auto") -> FFGradOutput:
    """Loss, activations, goodness and the exact local gradient of one FF layer; nothing is updated."""
    check_ff_inputs(x_pos, x_neg, weight, bias)
    with torch.no_grad():
        return _backend(backend, weight).grad(x_pos.detach(), x_neg.detach(), weight.detach(),
                                              None if bias is None else bias.detach(), config)


def ff_update(weight, bias, grad_weight, grad_bias, state_weight, state_bias, step: int,
              config: FFConfig = FFConfig(), *, loss=None, backend="auto") -> None:
    """Apply update number ``step`` (1-based) in place; skipped when ``loss`` is given and not finite."""
    with torch.no_grad():
        _backend(backend, weight).update(weight.detach(), None if bias is None else bias.detach(), grad_weight,
                                         grad_bias, tuple(state_weight), tuple(state_bias or ()), step, config,
                                         loss=loss)


def ff_step(x_pos, x_neg, weight, bias, state_weight, state_bias, step: int, config: FFConfig = FFConfig(), *,
            backend="auto") -> FFStepOutput:
    """One fused FF step: forward, loss, local gradient and the in-place update of weight/bias/state.

    The update is skipped (everything left as it was) when the loss is not finite; check ``out.loss``.
    """
    check_ff_inputs(x_pos, x_neg, weight, bias)
    with torch.no_grad():
        return _backend(backend, weight).step(x_pos.detach(), x_neg.detach(), weight.detach(),
                                              None if bias is None else bias.detach(), tuple(state_weight),
                                              tuple(state_bias or ()), step, config)
