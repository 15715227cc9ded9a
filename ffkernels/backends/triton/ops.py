"""The Triton backend's torch.library ops: ``ffkernels_triton::ff_grad``, ``ff_update`` and ``ff_step``.

The same schemas as the compiled ``ffkernels::`` ops (python_api/ff_api.cpp; docs/design.md, "The ops"):
the options as one string (``FFConfig.op_options``), ``None`` for unused state. Every kernel launch runs inside
``on_device(weight)`` (launch.py): Triton launches on the current CUDA device, which need not be the tensors'. On GPUs they are ``torch.library.triton_op``s: torch.compile sees the kernels inside
(launched through ``wrap_triton``) and can schedule them. Under the Triton interpreter the kernels are
plain Python functions that torch cannot trace, so the same functions are registered as opaque
``custom_op``s with fake kernels instead. Both declare what they mutate, so ``torch.library.opcheck``
applies.

Under torch.autocast the options say ``gemm_dtype=bfloat16`` (docs/design.md, "Mixed precision"): kernel 0
(gemm_operands.py) writes the bf16 x̂, the weight is cast to bf16 once per call for kernel 1, and kernels 1 and 3 run
their ``GEMM`` variants (bf16 GEMMs with fp32 accumulation, rounded outputs; everything else fp32, the fp32 weight
the master). float16 GEMMs are refused (``_check_gemm``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from triton.runtime.jit import JITFunction

from ..._types import dtype_name as _name
from ...config import FFConfig
from .. import contract
from . import settings
from .forward_kernel import ff_forward_kernel, launch_forward
from .gemm_operands import launch_gemm_normalize
from .launch import on_device
from .loss_kernel import launch_loss
from .optim_args import optim_args
from .update_kernel import launch_update
from .weight_grad_kernel import launch_weight_grad

NAMESPACE = "ffkernels_triton"
TRACEABLE = isinstance(ff_forward_kernel, JITFunction)  # False under TRITON_INTERPRET=1


# ---- argument checks (messages name the problem; the kernels assume all of this) -------------------------

def _check_device_and_dtype(weight: Tensor) -> None:
    if not (weight.device.type == "cuda" or (weight.device.type == "cpu" and not TRACEABLE)):
        where = "CUDA tensors" + ("" if TRACEABLE else " or CPU tensors")
        hint = " (CPU tensors need the Triton interpreter: TRITON_INTERPRET=1 before importing ffkernels)" \
            if weight.device.type == "cpu" else ""
        raise ValueError(f"ffkernels: the Triton backend runs on {where}; weight is on {weight.device}{hint}")
    if weight.dtype not in settings.supported_dtypes():
        names = ", ".join(_name(d) for d in settings.supported_dtypes())
        mode = "under the Triton interpreter" if settings.interpreting() else "on GPUs"
        raise TypeError(f"ffkernels: the Triton backend supports {names} {mode}, got {_name(weight.dtype)}")


def _check_inputs(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], in_place: bool):
    """Checks the FF inputs; returns contiguous x_pos, x_neg, weight, bias (weight and bias must already be
    contiguous when they are updated ``in_place``)."""
    contract.check_weight(weight)
    contract.check_ff_inputs(x_pos, x_neg, weight, bias)  # shapes, devices and dtypes agree
    _check_device_and_dtype(weight)
    contract.check_param(weight, weight, "weight", in_place)
    if bias is not None:
        contract.check_param(weight, bias, "bias", in_place)
        bias = bias.contiguous()
    return x_pos.contiguous(), x_neg.contiguous(), weight.contiguous(), bias


def _check_all_states(weight, bias, states, cfg: FFConfig) -> None:
    contract.check_states(weight, states[:2], cfg, "weight")
    if bias is not None:
        contract.check_states(bias, states[2:], cfg, "bias")


def _check_peer_mean(peer_mean: Optional[Tensor], weight: Tensor, cfg: FFConfig, in_place: bool):
    """contract.check_peer_mean; returns peer_mean contiguous, or None when peer normalization is off (where
    it is ignored)."""
    contract.check_peer_mean(peer_mean, weight, cfg, in_place)
    return peer_mean.contiguous() if cfg.peer_norm != 0.0 else None


# ---- the kernels, in order -----------------------------------------------------------------------------

def _forward(x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean: Optional[Tensor]):
    """Kernels (0,) 1 and 2: loss, h_pos, h_neg, g_pos, g_neg, the row coefficients/divisors for kernel 3 and, with
    peer normalization (``peer_mean`` = r given), (v, r', r) for kernel 3 (else None); plus the x_pos, x_neg kernel 3
    reads (under autocast kernel 0's bf16 x̂) and the norm it applies ("none" for x̂)."""
    peer = peer_mean is not None
    gemm = settings.gemm_code(cfg.gemm_dtype)
    norm = cfg.norm
    if gemm:  # bf16 GEMM operands: x̂ by kernel 0, W cast once (the fp32 weight stays the master)
        x_pos, x_neg = launch_gemm_normalize(x_pos, x_neg, cfg.norm, cfg.norm_eps, gemm)
        norm = "none"
    h_pos, h_neg, ss_part, den, colsum_part = launch_forward(
        x_pos, x_neg, weight.to(torch.bfloat16) if gemm else weight, bias, norm, cfg.norm_eps, peer=peer, gemm=gemm)
    loss, g_pos, g_neg, coef, r_new, v = launch_loss(
        ss_part, x_pos.shape[0], weight.shape[0], weight.dtype, cfg,
        peer=(colsum_part, peer_mean, cfg.peer_norm, cfg.peer_momentum) if peer else None)
    return loss, h_pos, h_neg, g_pos, g_neg, coef, den, ((v, r_new, peer_mean) if peer else None), (x_pos, x_neg, norm)


def _check_gemm(cfg: FFConfig, weight: Optional[Tensor] = None) -> None:
    """The GEMM dtypes the Triton kernels run (settings.GEMM_DTYPES): the parameters' own, and bfloat16 for float32
    weights (torch.autocast, "Mixed precision"). float16 GEMMs are refused, never run in fp32 instead."""
    if cfg.gemm_dtype not in settings.GEMM_DTYPES:
        raise NotImplementedError(f"ffkernels: the triton kernels have no {cfg.gemm_dtype} GEMMs for float32 weights "
                                  f"(gemm_dtype={cfg.gemm_dtype}, i.e. torch.autocast with that dtype); they run "
                                  "bfloat16 ones: use torch.autocast(dtype=torch.bfloat16), run outside autocast, or "
                                  "use backend='reference'")
    if cfg.gemm_dtype != "param" and isinstance(weight, Tensor) and weight.dtype != torch.float32:
        raise TypeError(f"ffkernels: {cfg.gemm_dtype} GEMMs need float32 weights (fp32 master weights), got "
                        f"{_name(weight.dtype)}")


# ---- ffkernels_triton::ff_grad --------------------------------------------------------------------------

def ff_grad(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], peer_mean: Optional[Tensor],
            options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias (empty without bias). Nothing is updated (with
    peer normalization, ``peer_mean`` = r is only read: the loss and gradient include L_peer)."""
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    x_pos, x_neg, weight, bias = _check_inputs(x_pos, x_neg, weight, bias, in_place=False)
    peer_mean = _check_peer_mean(peer_mean, weight, cfg, in_place=False)
    with on_device(weight):  # Triton launches on the current device: make it the tensors' one
        loss_t, h_pos, h_neg, g_pos, g_neg, coef, den, peer, (xp, xn, norm) = _forward(x_pos, x_neg, weight, bias,
                                                                                      cfg, peer_mean)
        grad_w, grad_b = launch_weight_grad(xp, xn, h_pos, h_neg, coef, den, loss_t, weight, bias, norm, peer=peer,
                                            gemm=settings.gemm_code(cfg.gemm_dtype))
    return loss_t, h_pos, h_neg, g_pos, g_neg, grad_w, grad_b if grad_b is not None else weight.new_empty(0)


def _ff_grad_fake(x_pos, x_neg, weight, bias, peer_mean, options):
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    _check_inputs(x_pos, x_neg, weight, bias, in_place=False)
    _check_peer_mean(peer_mean, weight, cfg, in_place=False)
    return contract.grad_outputs_like(x_pos, weight, bias)


# ---- ffkernels_triton::ff_update ------------------------------------------------------------------------

def ff_update(weight: Tensor, bias: Optional[Tensor], grad_weight: Tensor, grad_bias: Optional[Tensor],
              state1_weight: Optional[Tensor], state2_weight: Optional[Tensor], state1_bias: Optional[Tensor],
              state2_bias: Optional[Tensor], loss: Optional[Tensor], step: int, options: str) -> None:
    """Update number ``step`` of weight/bias and their state, in place; skipped on the device if ``loss``
    is given and not finite."""
    update, grads = _update_args(weight, bias, grad_weight, grad_bias, state1_weight, state2_weight, state1_bias,
                                 state2_bias, loss, step, options)
    with on_device(weight):
        launch_update(weight, grads[0], state1_weight, state2_weight, loss, update)
        if bias is not None:
            launch_update(bias, grads[1], state1_bias, state2_bias, loss, update)


def _update_args(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, options):
    cfg = FFConfig.from_op_options(options)
    contract.check_step(step)
    contract.check_weight(weight)
    _check_device_and_dtype(weight)
    contract.check_param(weight, weight, "weight")
    grads = [contract.check_grad(weight, grad_weight, "weight")]
    if bias is not None:
        contract.check_param(weight, bias, "bias")
        grads.append(contract.check_grad(bias, grad_bias, "bias"))
    elif grad_bias is not None:
        raise ValueError("ffkernels: grad_bias was given but there is no bias")
    _check_all_states(weight, bias, (s1w, s2w, s1b, s2b), cfg)
    contract.check_loss_guard(loss, weight)
    return optim_args(step, cfg), grads


def _ff_update_fake(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, options):
    _update_args(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, options)


# ---- ffkernels_triton::ff_step --------------------------------------------------------------------------

def ff_step(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], state1_weight: Optional[Tensor],
            state2_weight: Optional[Tensor], state1_bias: Optional[Tensor], state2_bias: Optional[Tensor],
            peer_mean: Optional[Tensor], step: int, options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused step: loss, h_pos, h_neg, g_pos, g_neg with the weights before the update, which kernel 3
    applies in place from dW tiles in registers; skipped on the device when the loss is not finite. With peer
    normalization kernel 3 also commits peer_mean <- r' then (and only then)."""
    states = (state1_weight, state2_weight, state1_bias, state2_bias)
    x_pos, x_neg, cfg, update, peer_mean = _step_args(x_pos, x_neg, weight, bias, states, peer_mean, step, options)
    with on_device(weight):
        loss_t, h_pos, h_neg, g_pos, g_neg, coef, den, peer, (xp, xn, norm) = _forward(x_pos, x_neg, weight, bias,
                                                                                      cfg, peer_mean)
        launch_weight_grad(xp, xn, h_pos, h_neg, coef, den, loss_t, weight, bias, norm, update=update,
                           states=states, peer=peer, gemm=settings.gemm_code(cfg.gemm_dtype))
    return loss_t, h_pos, h_neg, g_pos, g_neg


def _step_args(x_pos, x_neg, weight, bias, states, peer_mean, step, options):
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    contract.check_step(step)
    x_pos, x_neg, _, _ = _check_inputs(x_pos, x_neg, weight, bias, in_place=True)
    _check_all_states(weight, bias, states, cfg)
    peer_mean = _check_peer_mean(peer_mean, weight, cfg, in_place=True)
    return x_pos, x_neg, cfg, optim_args(step, cfg), peer_mean


def _ff_step_fake(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, peer_mean, step, options):
    _step_args(x_pos, x_neg, weight, bias, (s1w, s2w, s1b, s2b), peer_mean, step, options)
    return contract.step_outputs_like(x_pos, weight)


# ---- registration -----------------------------------------------------------------------------------------

_PARAMS_AND_STATE = ("weight", "bias", "state1_weight", "state2_weight", "state1_bias", "state2_bias")


def _register(name: str, fn, mutates_args, fake):
    qualname = f"{NAMESPACE}::{name}"
    if TRACEABLE:
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


ff_grad_op = _register("ff_grad", ff_grad, (), _ff_grad_fake)
ff_update_op = _register("ff_update", ff_update, _PARAMS_AND_STATE, _ff_update_fake)
ff_step_op = _register("ff_step", ff_step, _PARAMS_AND_STATE + ("peer_mean",), _ff_step_fake)
