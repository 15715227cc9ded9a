"""The Triton backend's conv FF ops: ``ffkernels_triton::ff_conv_grad`` and ``ff_conv_step``.

The schemas, checks and outputs of the compiled ``ffkernels::`` conv ops (python_api/ff_api.cpp; docs/design.md, "The
ops", "Convolutional FF"), registered as ops.py registers the linear ones (``triton_op`` on GPUs, an opaque
``custom_op`` with a fake under the interpreter). Four launches and one tiny one, no host synchronization:

    C0   conv_norm_kernel.py          the per-image divisors d (not for norm="none")
    C1   conv_forward_kernel.py       implicit-GEMM convolution; epilogue z / d + b, relu, h, partial goodness
    C2   conv_loss_kernel.py          goodness, loss terms and dL/dz coefficients per image; C2b the loss
    C3   conv_weight_grad_kernel.py   implicit-GEMM weight gradient with Adam/SGD in its epilogue (3b with a split)

The competitive loss's labels: for CPU tensors (the interpreter) their range is read on the host, a ValueError as the
CPU op; on a GPU they are not read (a host sync per step): they are clamped and the loss made NaN when one was out of
range, so nothing is updated (as the compiled CUDA op, ``poison_loss``). Under torch.autocast (gemm_dtype=bfloat16,
docs/design.md "Mixed precision") kernel C0b (gemm_operands.py) writes x̂ = x / d rounded to bf16 (C0 first, as
ever), the weight is cast to bf16 once, and C1 and C3 run their GEMM variants on them with norm "none"; float16 is
refused, as by the linear Triton ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..._types import ConvGeometry
from ...config import CONV_OPTION_KEYS, FFConfig
from .. import contract
from ..contract_conv import check_conv_inputs, conv_outputs_like
from . import settings
from .conv_forward_kernel import launch_conv_forward
from .conv_loss_kernel import launch_conv_loss
from .conv_norm_kernel import launch_conv_norm
from .conv_problem import conv_problem
from .conv_weight_grad_kernel import launch_conv_weight_grad
from .gemm_operands import launch_conv_gemm_normalize
from .labeled import _host_readable
from .launch import on_device
from .ops import _PARAMS_AND_STATE, _check_all_states, _check_device_and_dtype, _check_gemm, _register
from .optim_args import NO_UPDATE, optim_args


def _conv_config(options: str) -> FFConfig:
    """The options of a conv op (FFConfig.conv_op_options): every key of CONV_OPTION_KEYS, as the C++ parser asks."""
    cfg = FFConfig.from_op_options(options, conv=True)
    given = {item.partition("=")[0] for item in options.split(";")}
    missing = [k for k in CONV_OPTION_KEYS if k not in given]
    if missing:
        raise ValueError(f"ffkernels: options {options!r} lack {', '.join(missing)} (see FFConfig.conv_op_options)")
    _check_gemm(cfg)
    return cfg


def _check_conv(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes, cfg: FFConfig,
                in_place: bool):
    """The compiled conv ops' checks (ff_api.cpp check_conv, contract_conv.py's messages). Returns contiguous x_pos,
    x_neg, int64 target, the problem's sizes and, on a GPU, a 0-d bool tensor: a target label out of range (else
    None)."""
    if any(len(v) != 2 for v in (stride, padding, dilation)):
        raise ValueError(f"ffkernels: stride, padding and dilation must be pairs (h, w), got stride={list(stride)}, "
                         f"padding={list(padding)}, dilation={list(dilation)}")
    competitive = cfg.loss == "competitive"
    if not competitive and x_neg is None:
        raise ValueError(f"ffkernels: the {cfg.loss} loss needs x_neg, the negatives (the shape of x_pos)")
    if competitive and target is None:
        raise ValueError("ffkernels: the competitive loss needs target, one integer class label per image")
    geom = ConvGeometry(tuple(stride), tuple(padding), tuple(dilation), int(groups))
    check_conv_inputs(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes, check_range=False)
    _check_gemm(cfg, weight)
    _check_device_and_dtype(weight)
    contract.check_param(weight, weight, "weight", in_place=True)  # as the compiled ops: contiguous in both
    if bias is not None:
        contract.check_param(weight, bias, "bias", in_place)
    pr = conv_problem(x_pos, weight, geom.stride, geom.padding, geom.dilation, geom.groups,
                      1 if competitive else 2, cfg.goodness_over, num_classes)
    x_neg = None if competitive else x_neg.contiguous()
    bad = None
    if competitive:
        target = target.to(torch.int64).contiguous()
        if target.is_cuda:  # not read on the host: clamped for the kernels, the loss poisoned (_run)
            bad = ((target < 0) | (target >= num_classes)).any()
            target = target.clamp(0, num_classes - 1)
        elif _host_readable(target):
            lo, hi = torch.stack([target.min(), target.max()]).tolist()
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"ffkernels: target labels must be in [0, {num_classes}), got {lo if lo < 0 else hi}")
    return x_pos.contiguous(), x_neg, target, pr, bad


def _run(x_pos, x_neg, target, weight, bias, pr, bad, cfg: FFConfig, update, states):
    """Kernels C0-C3: (loss, h_pos, h_neg, g_pos, g_neg) and, without an update, (grad_w, grad_b)."""
    gemm = settings.gemm_code(cfg.gemm_dtype)
    norm, w_gemm = cfg.norm, weight
    with on_device(weight):  # Triton launches on the current device: make it the tensors' one
        den = launch_conv_norm(x_pos, x_neg, cfg.norm, cfg.norm_eps)
        if gemm:  # bf16 operands: x̂ by kernel C0b, W cast once (the fp32 weight stays the master)
            x_pos, x_neg = launch_conv_gemm_normalize(x_pos, x_neg, den, cfg.norm, gemm)
            norm, den, w_gemm = "none", None, weight.to(torch.bfloat16)
        h_pos, h_neg, part, layout = launch_conv_forward(x_pos, x_neg, w_gemm, bias, den, pr, norm,
                                                         cfg.goodness_power, gemm=gemm)
        loss, g_pos, g_neg, coef = launch_conv_loss(part, layout, pr, weight.dtype, cfg, target)
        if bad is not None:  # a label out of range (GPU): a NaN loss, so no update
            loss.masked_fill_(bad, float("nan"))
        grads = launch_conv_weight_grad(x_pos, x_neg, h_pos, h_neg, coef, den, loss, weight, bias, pr, norm,
                                        cfg.goodness_power, update=update, states=states, gemm=gemm)
    # no negatives: empty h_neg and g_neg, as the compiled ops (two tensors: outputs may not alias)
    outs = (loss, h_pos, weight.new_empty(0) if h_neg is None else h_neg, g_pos,
            weight.new_empty(0) if g_neg is None else g_neg)
    return outs, grads


# ---- ffkernels_triton::ff_conv_grad -------------------------------------------------------------------------------

def ff_conv_grad(x_pos: Tensor, x_neg: Optional[Tensor], target: Optional[Tensor], weight: Tensor,
                 bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int], groups: int,
                 num_classes: int, options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias (h_neg, g_neg empty for the competitive loss;
    grad_bias empty without bias). Nothing is updated."""
    cfg = _conv_config(options)
    x_pos, x_neg, target, pr, bad = _check_conv(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups,
                                                num_classes, cfg, in_place=False)
    bias = bias.contiguous() if bias is not None else None
    outs, (grad_w, grad_b) = _run(x_pos, x_neg, target, weight, bias, pr, bad, cfg, NO_UPDATE,
                                  (None, None, None, None))
    return (*outs, grad_w, grad_b if grad_b is not None else weight.new_empty(0))


def _ff_conv_grad_fake(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes, options):
    cfg = _conv_config(options)
    _check_conv(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes, cfg, False)
    gb = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return (*conv_outputs_like(x_pos, x_neg, weight, stride, padding, dilation, num_classes, options),
            torch.empty_like(weight), gb)


# ---- ffkernels_triton::ff_conv_step -------------------------------------------------------------------------------

def ff_conv_step(x_pos: Tensor, x_neg: Optional[Tensor], target: Optional[Tensor], weight: Tensor,
                 bias: Optional[Tensor], state1_weight: Optional[Tensor], state2_weight: Optional[Tensor],
                 state1_bias: Optional[Tensor], state2_bias: Optional[Tensor], stride: List[int], padding: List[int],
                 dilation: List[int], groups: int, num_classes: int, step: int,
                 options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused conv step: loss, h_pos, h_neg, g_pos, g_neg with the weights before the update, which kernel C3
    applies in place from the dW tiles in registers; skipped on the device when the loss is not finite."""
    states = (state1_weight, state2_weight, state1_bias, state2_bias)
    x_pos, x_neg, target, pr, bad, cfg, update = _step_args(x_pos, x_neg, target, weight, bias, states, stride,
                                                            padding, dilation, groups, num_classes, step, options)
    outs, _ = _run(x_pos, x_neg, target, weight, bias, pr, bad, cfg, update, states)
    return outs


def _step_args(x_pos, x_neg, target, weight, bias, states, stride, padding, dilation, groups, num_classes, step,
               options):
    cfg = _conv_config(options)
    contract.check_step(step)
    checked = _check_conv(x_pos, x_neg, target, weight, bias, stride, padding, dilation, groups, num_classes, cfg,
                          in_place=True)
    _check_all_states(weight, bias, states, cfg)
    return (*checked, cfg, optim_args(step, cfg))


def _ff_conv_step_fake(x_pos, x_neg, target, weight, bias, s1w, s2w, s1b, s2b, stride, padding, dilation, groups,
                       num_classes, step, options):
    _step_args(x_pos, x_neg, target, weight, bias, (s1w, s2w, s1b, s2b), stride, padding, dilation, groups,
               num_classes, step, options)
    return conv_outputs_like(x_pos, x_neg, weight, stride, padding, dilation, num_classes, options)


ff_conv_grad_op = _register("ff_conv_grad", ff_conv_grad, (), _ff_conv_grad_fake)
ff_conv_step_op = _register("ff_conv_step", ff_conv_step, _PARAMS_AND_STATE, _ff_conv_step_fake)
