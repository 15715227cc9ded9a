"""The contract every backend shares: input, state and gradient checks, and the shapes of the ops' results.

Every check raises an exception whose message names the problem; the kernels assume all of it. This module
imports only torch and the leaf modules ``config`` and ``_types`` (see docs/design.md, "Backends").
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .._types import BackendUnavailableError
from .._types import dtype_name as _name
from ..config import FFConfig


_AUTOCAST_GEMM = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def autocast_gemm_dtype(weight: Tensor) -> str:
    """The GEMM operand dtype (``FFConfig.gemm_dtype``) the current ``torch.autocast`` asks of a step on ``weight``:
    "bfloat16"/"float16" inside an enabled autocast of weight's device type for float32 weights (fp32 master weights;
    like nn.Linear, autocast leaves float64 alone, and lower-precision weights are already low), else "param"."""
    device_type = weight.device.type
    if weight.dtype != torch.float32 or not torch.is_autocast_enabled(device_type):
        return "param"
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in _AUTOCAST_GEMM:
        raise TypeError(f"ffkernels: torch.autocast with dtype {_name(dtype)} is not supported by the FF steps; use "
                        "torch.bfloat16 (or torch.float16 on CUDA)")
    return _AUTOCAST_GEMM[dtype]


def autocast_config(cfg: FFConfig, weight: Tensor) -> FFConfig:
    """``cfg`` with the GEMM dtype of the current autocast (``autocast_gemm_dtype``); ``cfg`` itself outside it."""
    gemm = autocast_gemm_dtype(weight)
    return cfg if gemm == cfg.gemm_dtype else _with_gemm(cfg, gemm)


@lru_cache(maxsize=256)
def _with_gemm(cfg: FFConfig, gemm: str) -> FFConfig:
    return cfg.replace(gemm_dtype=gemm)


def check_gemm_dtype(backend, cfg: FFConfig) -> None:
    """Raise BackendUnavailableError unless ``backend`` runs ``cfg.gemm_dtype`` (its ``gemm_dtypes``)."""
    supported = getattr(backend, "gemm_dtypes", ("param",))
    if cfg.gemm_dtype not in supported:
        others = [g for g in supported if g != "param"]
        raise BackendUnavailableError(
            f"ffkernels: backend {backend.name!r} has no {cfg.gemm_dtype} GEMMs (torch.autocast with "
            f"dtype=torch.{cfg.gemm_dtype}"
            + (f"; it supports {', '.join(others)}" if others else "; it runs no lower-precision GEMMs yet")
            + "); run the step outside autocast, or use backend='reference' (or 'cpu' for bfloat16 on CPUs)")


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is fp32, or fp64 for fp64 parameters."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_ff_inputs(x_pos, x_neg, weight: Tensor, bias=None) -> None:
    """Raise a clear exception unless x_pos, x_neg are (B, in_features) tensors matching weight/bias."""
    for nm, x in (("x_pos", x_pos), ("x_neg", x_neg)):
        if not isinstance(x, Tensor):
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


def check_label_dtype(labels: Tensor, name: str = "labels") -> None:
    """TypeError unless ``labels`` holds integers (not bool): a float label such as 2.7 is refused, never read as
    class 2. Every labeled path checks this: the compiled ops (check_labeled in ff_api.cpp, the same message), the
    Triton ops and the pair built by ``embed_label`` / ``embed_label_unchecked`` (the reference backend's path)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"ffkernels: {name} must be an integer tensor, got {labels.dtype}")


def check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"ffkernels: weight must be a non-empty 2-D (out_features, in_features) tensor, got {shape}")


def check_param(weight: Tensor, p: Tensor, name: str, in_place: bool = True) -> None:
    """``p`` (weight or bias) agrees with weight, and is contiguous when it is updated in place."""
    if p.device != weight.device:
        raise ValueError(f"ffkernels: {name} is on {p.device} but weight is on {weight.device}")
    if p.dtype != weight.dtype:
        raise TypeError(f"ffkernels: {name} dtype {_name(p.dtype)} differs from weight dtype {_name(weight.dtype)}")
    if in_place and not p.is_contiguous():
        raise ValueError(f"ffkernels: {name} must be contiguous (it is updated in place)")


def check_states(param: Tensor, states, cfg: FFConfig, which: str) -> None:
    """The optimizer state slots of one parameter: those ``cfg`` uses must be given, shaped and typed right."""
    needed = cfg.state_names
    for i, st in enumerate(states):
        if i >= len(needed):
            continue  # a slot this optimizer does not use: ignored
        name = f"{needed[i]} ({which})"
        if st is None:
            raise ValueError(f"ffkernels: {cfg.optimizer}"
                             f"{' with momentum' if cfg.optimizer == 'sgd' else ''} needs {name}")
        if st.shape != param.shape:
            raise ValueError(f"ffkernels: optimizer state {name} must have the parameter's shape "
                             f"{tuple(param.shape)}, got {tuple(st.shape)}")
        if st.device != param.device:
            raise ValueError(f"ffkernels: optimizer state {name} is on {st.device} but its parameter is on "
                             f"{param.device}")
        if st.dtype != state_dtype(param.dtype):
            raise TypeError(f"ffkernels: optimizer state {name} must be {_name(state_dtype(param.dtype))} for "
                            f"{_name(param.dtype)} parameters, got {_name(st.dtype)}")
        if not st.is_contiguous():
            raise ValueError(f"ffkernels: optimizer state {name} must be contiguous")


def check_peer_mean(peer_mean: Optional[Tensor], weight: Tensor, cfg: FFConfig, in_place: bool) -> None:
    """The running mean r of peer normalization: needed iff cfg.peer_norm > 0, a (N,) state-dtype tensor.

    Ignored (may be None) when peer normalization is off. ``in_place``: it is updated (r <- r'), so it must
    be contiguous.
    """
    if cfg.peer_norm == 0.0:
        return
    want = f"a ({weight.shape[0]},) {_name(state_dtype(weight.dtype))} tensor on {weight.device}"
    if peer_mean is None:
        raise ValueError(f"ffkernels: peer_norm > 0 needs peer_mean, the running mean of the positive activations: "
                         f"{want} (FFLinear keeps it as its buffer peer_mean)")
    if not isinstance(peer_mean, Tensor):
        raise TypeError(f"ffkernels: peer_mean must be a torch.Tensor, got {type(peer_mean).__name__}")
    if peer_mean.shape != (weight.shape[0],):
        raise ValueError(f"ffkernels: peer_mean must have shape ({weight.shape[0]},) (one per output unit), got "
                         f"{tuple(peer_mean.shape)}")
    if peer_mean.device != weight.device:
        raise ValueError(f"ffkernels: peer_mean is on {peer_mean.device} but weight is on {weight.device}")
    if peer_mean.dtype != state_dtype(weight.dtype):
        raise TypeError(f"ffkernels: peer_mean must be {_name(state_dtype(weight.dtype))} for {_name(weight.dtype)} "
                        f"weights (the optimizer-state dtype), got {_name(peer_mean.dtype)}")
    if in_place and not peer_mean.is_contiguous():
        raise ValueError("ffkernels: peer_mean must be contiguous (it is updated in place)")


def check_grad(param: Tensor, grad: Optional[Tensor], which: str) -> Tensor:
    """A gradient for ``param``; returned contiguous."""
    if grad is None:
        raise ValueError(f"ffkernels: grad_{which} must be given exactly when the layer has a {which}")
    if grad.shape != param.shape:
        raise ValueError(f"ffkernels: grad_{which} must have shape {tuple(param.shape)}, got {tuple(grad.shape)}")
    if grad.device != param.device or grad.dtype != param.dtype:
        raise ValueError(f"ffkernels: grad_{which} must be {_name(param.dtype)} on {param.device}, got "
                         f"{_name(grad.dtype)} on {grad.device}")
    return grad.contiguous()


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, torch.SymInt)) or step < 1:
        raise ValueError(f"ffkernels: step must be >= 1 (the 1-based number of this update), got {step!r}")
    return step


def check_loss_guard(loss: Optional[Tensor], weight: Tensor) -> None:
    if loss is not None and (loss.numel() != 1 or loss.device != weight.device):
        raise ValueError(f"ffkernels: loss must be a one-element tensor on {weight.device}, got shape "
                         f"{tuple(loss.shape)} on {loss.device}")


def state_slots(states) -> list:
    """The ops' two state slots of one parameter: its state tensors, None where the optimizer keeps less."""
    states = tuple(states or ())
    return list(states) + [None] * (2 - len(states))


def step_outputs_like(x: Tensor, weight: Tensor) -> tuple:
    """Empty loss, h_pos, h_neg, g_pos, g_neg for B = x.shape[0] rows and N = weight.shape[0] features."""
    B, N = x.shape[0], weight.shape[0]
    return x.new_empty(()), x.new_empty((B, N)), x.new_empty((B, N)), x.new_empty((B,)), x.new_empty((B,))


def grad_outputs_like(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple:
    """``step_outputs_like`` plus grad_weight and grad_bias (empty without a bias: schemas return no None)."""
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return (*step_outputs_like(x, weight), torch.empty_like(weight), gb)
