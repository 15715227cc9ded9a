"""Functional FF ops on plain tensors: checks the inputs, then runs one backend.

The module API (FFLinear, FFNet) is built on these; they are public for users who keep their own
parameters and state (e.g. data-parallel training: ``ff_grad`` -> all-reduce -> ``ff_update``).
"""
from __future__ import annotations

import torch

from ._types import FFGradOutput, FFStepOutput
from .backends import get_backend, resolve_backend
from .backends.contract import autocast_config, check_ff_inputs, check_gemm_dtype, check_peer_mean
from .config import FFConfig


def _backend(backend: str, weight: torch.Tensor):
    return get_backend(resolve_backend(backend, weight.device, weight.dtype))


def _step_backend(backend: str, weight: torch.Tensor, config: FFConfig):
    """(backend, config with the GEMM dtype of the current torch.autocast); refuses a backend without that GEMM dtype
    (docs/design.md, "Mixed precision")."""
    b = _backend(backend, weight)
    cfg = autocast_config(config, weight)
    check_gemm_dtype(b, cfg)
    return b, cfg


def ff_grad(x_pos, x_neg, weight, bias=None, config: FFConfig = FFConfig(), *, peer_mean=None,
            backend="auto") -> FFGradOutput:
    """Loss, activations, goodness and the exact local gradient of one FF layer; nothing is updated.

    With ``config.peer_norm > 0``, ``peer_mean`` (the running mean r, (out_features,), fp32 or fp64 for fp64
    weights) is required and only read.
    """
    check_ff_inputs(x_pos, x_neg, weight, bias)
    check_peer_mean(peer_mean, weight, config, in_place=False)
    b, cfg = _step_backend(backend, weight, config)
    with torch.no_grad():
        return b.grad(x_pos.detach(), x_neg.detach(), weight.detach(), None if bias is None else bias.detach(), cfg,
                      peer_mean=peer_mean)


def ff_update(weight, bias, grad_weight, grad_bias, state_weight, state_bias, step: int,
              config: FFConfig = FFConfig(), *, loss=None, backend="auto") -> None:
    """Apply update number ``step`` (1-based) in place; skipped when ``loss`` is given and not finite."""
    with torch.no_grad():
        _backend(backend, weight).update(weight.detach(), None if bias is None else bias.detach(), grad_weight,
                                         grad_bias, tuple(state_weight), tuple(state_bias or ()), step, config,
                                         loss=loss)


def ff_step(x_pos, x_neg, weight, bias, state_weight, state_bias, step: int, config: FFConfig = FFConfig(), *,
            peer_mean=None, backend="auto") -> FFStepOutput:
    """One fused FF step: forward, loss, local gradient and the in-place update of weight/bias/state.

    The update is skipped (everything left as it was) when the loss is not finite; check ``out.loss``.
    With ``config.peer_norm > 0``, ``peer_mean`` is required and updated in place (r <- r') with the rest.
    Inside ``torch.autocast`` (float32 weights) the GEMMs run in its dtype, the rest in fp32 (docs/design.md, "Mixed
    precision"); so does ``ff_grad``.
    """
    check_ff_inputs(x_pos, x_neg, weight, bias)
    check_peer_mean(peer_mean, weight, config, in_place=True)
    b, cfg = _step_backend(backend, weight, config)
    with torch.no_grad():
        return b.step(x_pos.detach(), x_neg.detach(), weight.detach(), None if bias is None else bias.detach(),
                      tuple(state_weight), tuple(state_bias or ()), step, cfg, peer_mean=peer_mean)
