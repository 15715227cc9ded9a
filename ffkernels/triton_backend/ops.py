"""The Triton backend's torch.library ops: ``ffkernels_triton::ff_grad``, ``ff_update`` and ``ff_step``.

Same argument lists as the compiled ``ffkernels::`` ops (python_api/ff_api.cpp), with ``None`` for
unused state. On GPUs they are ``torch.library.triton_op``s: torch.compile sees the kernels inside
(launched through ``wrap_triton``) and can schedule them. Under the Triton interpreter the kernels are
plain Python functions that torch cannot trace, so the same functions are registered as opaque
``custom_op``s with fake kernels instead. Both declare what they mutate, so ``torch.library.opcheck``
applies.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from triton.runtime.jit import JITFunction

from .._types import dtype_name as _name
from ..config import FFConfig
from ..functional import check_ff_inputs
from . import settings
from .forward_kernel import ff_forward_kernel, launch_forward
from .loss_kernel import launch_loss
from .optim_args import optim_args
from .update_kernel import launch_update
from .weight_grad_kernel import launch_weight_grad

NAMESPACE = "ffkernels_triton"
TRACEABLE = isinstance(ff_forward_kernel, JITFunction)  # False under TRITON_INTERPRET=1


# ---- argument checks (messages name the problem; the kernels assume all of this) -------------------------

def _check_device(t: Tensor, what: str) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and not TRACEABLE):
        return
    where = "CUDA tensors" + ("" if TRACEABLE else " or CPU tensors")
    hint = " (CPU tensors need the Triton interpreter: TRITON_INTERPRET=1 before importing ffkernels)" \
        if t.device.type == "cpu" else ""
    raise ValueError(f"ffkernels: the Triton backend runs on {where}; {what} is on {t.device}{hint}")


def _check_device_and_dtype(weight: Tensor) -> None:
    _check_device(weight, "weight")
    if weight.dtype not in settings.supported_dtypes():
        names = ", ".join(_name(d) for d in settings.supported_dtypes())
        mode = "under the Triton interpreter" if settings.interpreting() else "on GPUs"
        raise TypeError(f"ffkernels: the Triton backend supports {names} {mode}, got {_name(weight.dtype)}")


def _check_inputs(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], in_place: bool):
    """Checks the FF inputs; returns contiguous x_pos, x_neg, weight, bias (weight and bias must already be
    contiguous when they are updated ``in_place``)."""
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"ffkernels: weight must be a non-empty 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    check_ff_inputs(x_pos, x_neg, weight, bias)  # shapes, devices and dtypes agree
    _check_device_and_dtype(weight)
    _check_param(weight, weight, "weight", in_place)
    if bias is not None:
        _check_param(weight, bias, "bias", in_place)
        bias = bias.contiguous()
    return x_pos.contiguous(), x_neg.contiguous(), weight.contiguous(), bias


def _check_param(weight: Tensor, p: Tensor, name: str, in_place: bool = True) -> None:
    if p.device != weight.device:
        raise ValueError(f"ffkernels: {name} is on {p.device} but weight is on {weight.device}")
    if p.dtype != weight.dtype:
        raise TypeError(f"ffkernels: {name} dtype {_name(p.dtype)} differs from weight dtype {_name(weight.dtype)}")
    if in_place and not p.is_contiguous():
        raise ValueError(f"ffkernels: {name} must be contiguous (it is updated in place)")


def _check_states(param: Tensor, states, cfg: FFConfig, which: str) -> None:
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
        if st.dtype != torch.float32:
            raise TypeError(f"ffkernels: optimizer state {name} must be float32, got {_name(st.dtype)}")
        if not st.is_contiguous():
            raise ValueError(f"ffkernels: optimizer state {name} must be contiguous")


def _check_grad(param: Tensor, grad: Optional[Tensor], which: str) -> Tensor:
    if grad is None:
        raise ValueError(f"ffkernels: grad_{which} must be given exactly when the layer has a {which}")
    if grad.shape != param.shape:
        raise ValueError(f"ffkernels: grad_{which} must have shape {tuple(param.shape)}, got {tuple(grad.shape)}")
    if grad.device != param.device or grad.dtype != param.dtype:
        raise ValueError(f"ffkernels: grad_{which} must be {_name(param.dtype)} on {param.device}, got "
                         f"{_name(grad.dtype)} on {grad.device}")
    return grad.contiguous()


def _loss_config(norm, norm_eps, goodness, threshold, loss, symba_alpha) -> FFConfig:
    return FFConfig(norm=norm, norm_eps=norm_eps, goodness=goodness, threshold=threshold, loss=loss,
                    symba_alpha=symba_alpha)  # validates the options with FFConfig's messages


def _optim_config(step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay) -> FFConfig:
    if isinstance(step, bool) or not isinstance(step, (int, torch.SymInt)) or step < 1:
        raise ValueError(f"ffkernels: step must be >= 1 (the 1-based number of this update), got {step!r}")
    return FFConfig(optimizer=optimizer, lr=lr, betas=(beta1, beta2), eps=eps, momentum=momentum,
                    weight_decay=weight_decay)


# ---- the kernels, in order -----------------------------------------------------------------------------

def _forward(x_pos, x_neg, weight, bias, cfg: FFConfig):
    """Kernels 1 and 2: loss, h_pos, h_neg, g_pos, g_neg and the row coefficients/divisors for kernel 3."""
    h_pos, h_neg, ss_part, den = launch_forward(x_pos, x_neg, weight, bias, cfg.norm, cfg.norm_eps)
    loss, g_pos, g_neg, coef = launch_loss(ss_part, x_pos.shape[0], weight.shape[0], weight.dtype, cfg.goodness,
                                           cfg.threshold, cfg.loss, cfg.symba_alpha)
    return loss, h_pos, h_neg, g_pos, g_neg, coef, den


def _outputs_like(x_pos: Tensor, weight: Tensor):
    B, N = x_pos.shape[0], weight.shape[0]
    return (x_pos.new_empty(()), x_pos.new_empty((B, N)), x_pos.new_empty((B, N)), x_pos.new_empty((B,)),
            x_pos.new_empty((B,)))


# ---- ffkernels_triton::ff_grad --------------------------------------------------------------------------

def ff_grad(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], norm: str, norm_eps: float,
            goodness: str, threshold: float, loss: str, symba_alpha: float
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias (empty without bias). Nothing is updated."""
    cfg = _loss_config(norm, norm_eps, goodness, threshold, loss, symba_alpha)
    x_pos, x_neg, weight, bias = _check_inputs(x_pos, x_neg, weight, bias, in_place=False)
    loss_t, h_pos, h_neg, g_pos, g_neg, coef, den = _forward(x_pos, x_neg, weight, bias, cfg)
    grad_w, grad_b = launch_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss_t, weight, bias, cfg.norm)
    return loss_t, h_pos, h_neg, g_pos, g_neg, grad_w, grad_b if grad_b is not None else weight.new_empty(0)


def _ff_grad_fake(x_pos, x_neg, weight, bias, norm, norm_eps, goodness, threshold, loss, symba_alpha):
    _loss_config(norm, norm_eps, goodness, threshold, loss, symba_alpha)
    x_pos, x_neg, weight, bias = _check_inputs(x_pos, x_neg, weight, bias, in_place=False)
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return (*_outputs_like(x_pos, weight), torch.empty_like(weight), gb)


# ---- ffkernels_triton::ff_update ------------------------------------------------------------------------

def ff_update(weight: Tensor, bias: Optional[Tensor], grad_weight: Tensor, grad_bias: Optional[Tensor],
              state1_weight: Optional[Tensor], state2_weight: Optional[Tensor], state1_bias: Optional[Tensor],
              state2_bias: Optional[Tensor], loss: Optional[Tensor], step: int, optimizer: str, lr: float,
              beta1: float, beta2: float, eps: float, momentum: float, weight_decay: float) -> None:
    """Update number ``step`` of weight/bias and their state, in place; skipped on the device if ``loss``
    is given and not finite."""
    update, grads = _update_args(weight, bias, grad_weight, grad_bias, state1_weight, state2_weight, state1_bias,
                                 state2_bias, loss, step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay)
    launch_update(weight, grads[0], state1_weight, state2_weight, loss, update)
    if bias is not None:
        launch_update(bias, grads[1], state1_bias, state2_bias, loss, update)


def _update_args(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, optimizer, lr, beta1, beta2,
                 eps, momentum, weight_decay):
    cfg = _optim_config(step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay)
    _check_device_and_dtype(weight)
    _check_param(weight, weight, "weight")
    grads = [_check_grad(weight, grad_weight, "weight")]
    _check_states(weight, (s1w, s2w), cfg, "weight")
    if bias is not None:
        _check_param(weight, bias, "bias")
        grads.append(_check_grad(bias, grad_bias, "bias"))
        _check_states(bias, (s1b, s2b), cfg, "bias")
    elif grad_bias is not None:
        raise ValueError("ffkernels: grad_bias was given but there is no bias")
    if loss is not None and (loss.numel() != 1 or loss.device != weight.device):
        raise ValueError(f"ffkernels: loss must be a one-element tensor on {weight.device}, got shape "
                         f"{tuple(loss.shape)} on {loss.device}")
    return optim_args(step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay), grads


def _ff_update_fake(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, optimizer, lr, beta1,
                    beta2, eps, momentum, weight_decay):
    _update_args(weight, bias, grad_weight, grad_bias, s1w, s2w, s1b, s2b, loss, step, optimizer, lr, beta1, beta2,
                 eps, momentum, weight_decay)


# ---- ffkernels_triton::ff_step --------------------------------------------------------------------------

def ff_step(x_pos: Tensor, x_neg: Tensor, weight: Tensor, bias: Optional[Tensor], state1_weight: Optional[Tensor],
            state2_weight: Optional[Tensor], state1_bias: Optional[Tensor], state2_bias: Optional[Tensor],
            step: int, norm: str, norm_eps: float, goodness: str, threshold: float, loss: str, symba_alpha: float,
            optimizer: str, lr: float, beta1: float, beta2: float, eps: float, momentum: float,
            weight_decay: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused step: loss, h_pos, h_neg, g_pos, g_neg with the weights before the update, which kernel 3
    applies in place from dW tiles in registers; skipped on the device when the loss is not finite."""
    x_pos, x_neg, cfg, update = _step_args(x_pos, x_neg, weight, bias, state1_weight, state2_weight, state1_bias,
                                           state2_bias, step, norm, norm_eps, goodness, threshold, loss,
                                           symba_alpha, optimizer, lr, beta1, beta2, eps, momentum, weight_decay)
    loss_t, h_pos, h_neg, g_pos, g_neg, coef, den = _forward(x_pos, x_neg, weight, bias, cfg)
    launch_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss_t, weight, bias, cfg.norm, update=update,
                       states=(state1_weight, state2_weight, state1_bias, state2_bias))
    return loss_t, h_pos, h_neg, g_pos, g_neg


def _step_args(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, step, norm, norm_eps, goodness, threshold, loss,
               symba_alpha, optimizer, lr, beta1, beta2, eps, momentum, weight_decay):
    cfg = _loss_config(norm, norm_eps, goodness, threshold, loss, symba_alpha)
    ocfg = _optim_config(step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay)
    x_pos, x_neg, _, _ = _check_inputs(x_pos, x_neg, weight, bias, in_place=True)
    _check_states(weight, (s1w, s2w), ocfg, "weight")
    if bias is not None:
        _check_states(bias, (s1b, s2b), ocfg, "bias")
    return x_pos, x_neg, cfg, optim_args(step, optimizer, lr, beta1, beta2, eps, momentum, weight_decay)


def _ff_step_fake(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, step, norm, norm_eps, goodness, threshold, loss,
                  symba_alpha, optimizer, lr, beta1, beta2, eps, momentum, weight_decay):
    x_pos, _, _, _ = _step_args(x_pos, x_neg, weight, bias, s1w, s2w, s1b, s2b, step, norm, norm_eps, goodness,
                                threshold, loss, symba_alpha, optimizer, lr, beta1, beta2, eps, momentum,
                                weight_decay)
    return _outputs_like(x_pos, weight)


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
ff_step_op = _register("ff_step", ff_step, _PARAMS_AND_STATE, _ff_step_fake)
