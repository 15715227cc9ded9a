"""The Triton backend's labeled first layer: ``ffkernels_triton::ff_grad_labeled`` and ``ff_step_labeled``.

The schemas of the compiled ops (python_api/ff_api.cpp; docs/design.md, "The ops"), registered the way ops.py
registers the others (``triton_op`` on GPUs, an opaque ``custom_op`` with a fake under the interpreter). Three
launches, B-row GEMMs: kernel 1L (forward_labeled_kernel.py: x~ W^T once for both sides, the label columns gathered
per row), kernel 2 unchanged (loss_kernel.py), kernel 3 with LABELED (weight_grad_kernel.py: the shared features'
gradient from dL/dz+ + dL/dz-, the label columns from the explicit rows), with the optimizer in its epilogue for
the step. Importing this module imports ops.py and registers both modules' ops. Under torch.autocast
(gemm_dtype=bfloat16) kernel 0 (gemm_operands.py, LABELED) writes the bf16 x~ = x / d with the label features zeroed
and lv_i = value / d_i rounded to bf16; kernels 1L and 3 run their GEMM variants on them and on the bf16 copy of W.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...config import FFConfig
from .. import contract
from . import settings
from .forward_labeled_kernel import launch_forward_labeled
from .gemm_operands import launch_gemm_normalize
from .loss_kernel import launch_loss
from .ops import _PARAMS_AND_STATE, _check_all_states, _check_gemm, _check_inputs, _check_peer_mean, _register
from .optim_args import NO_UPDATE, optim_args
from .weight_grad_kernel import launch_weight_grad


def _host_readable(t: Tensor) -> bool:
    """Whether ``t`` holds data the host may read: not while torch.compile traces the op with fake tensors."""
    return torch._guards.detect_fake_mode(t) is None and not torch.compiler.is_compiling()


def _check_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, in_place: bool):
    """The checks of the compiled ops' check_labeled (ff_api.cpp), same messages; returns contiguous x and the labels
    as contiguous int64. The labels' range needs their values: read on the host for CPU tensors (the interpreter),
    except while torch.compile traces. On a GPU it is not read (a synchronization per step): the kernels clamp the
    labels, so memory stays safe, and ``_run`` makes the loss NaN when one is out of range, so nothing is updated,
    as the compiled ops do (ff_api.cpp, poison_loss)."""
    x, _, weight, bias = _check_inputs(x, x, weight, bias, in_place)
    K = x.shape[1]
    if not 2 <= num_classes <= K:
        raise ValueError(f"ffkernels: num_classes must be in [2, {K}] (the labels are written into the first "
                         f"num_classes features), got {num_classes}")
    if not math.isfinite(label_value):
        raise ValueError(f"ffkernels: label_value must be finite, got {label_value}")
    labels = []
    for name, y in (("label_pos", label_pos), ("label_neg", label_neg)):
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"ffkernels: {name} must have shape ({x.shape[0]},), got {shape}")
        contract.check_label_dtype(y, name)
        if y.device != x.device:
            raise ValueError(f"ffkernels: {name} is on {y.device} but x is on {x.device}; all tensors must be on "
                             "the same device")
        labels.append(y.to(torch.int64).contiguous())
    if labels[0].is_cuda:  # no host read on a GPU (docs/design.md, "Host syncs"): _run poisons the loss instead
        return x, labels[0], labels[1]
    if _host_readable(labels[0]):
        lo_p, hi_p, lo_n, hi_n = torch.stack([labels[0].min(), labels[0].max(), labels[1].min(),
                                              labels[1].max()]).tolist()
        for name, lo, hi in (("label_pos", lo_p, hi_p), ("label_neg", lo_n, hi_n)):
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"ffkernels: {name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    return x, labels[0], labels[1]


def _run(x, y_pos, y_neg, num_classes, label_value, weight, bias, cfg: FFConfig, peer_mean, update, states):
    """Kernels 1L, 2 and 3: (loss, h_pos, h_neg, g_pos, g_neg) and, without an update, (grad_w, grad_b)."""
    peer = peer_mean is not None
    gemm = settings.gemm_code(cfg.gemm_dtype)
    norm, lv = cfg.norm, None
    if gemm:  # bf16 GEMM operands: x~ and lv by kernel 0, W cast once (the fp32 weight stays the master)
        x, lv = launch_gemm_normalize(x, None, cfg.norm, cfg.norm_eps, gemm, labels=(num_classes, label_value))
        norm = "none"
    h_pos, h_neg, ss_part, den, colsum_part = launch_forward_labeled(
        x, y_pos, y_neg, num_classes, label_value, weight.to(torch.bfloat16) if gemm else weight, bias, norm,
        cfg.norm_eps, peer=peer, gemm=gemm, lv=lv)
    if gemm:
        den = lv  # kernel 3 reads the label feature lv_i where it would read d_i
    loss, g_pos, g_neg, coef, r_new, v = launch_loss(
        ss_part, x.shape[0], weight.shape[0], weight.dtype, cfg,
        peer=(colsum_part, peer_mean, cfg.peer_norm, cfg.peer_momentum) if peer else None)
    if x.is_cuda:  # labels out of range (not read on the host, see _check_labeled): a NaN loss, so no update
        out = torch.logical_or((y_pos < 0) | (y_pos >= num_classes), (y_neg < 0) | (y_neg >= num_classes)).any()
        loss.masked_fill_(out, float("nan"))
    grads = launch_weight_grad(x, x, h_pos, h_neg, coef, den, loss, weight, bias, norm, update=update,
                               states=states, peer=(v, r_new, peer_mean) if peer else None,
                               labels=(y_pos, y_neg, num_classes, label_value), gemm=gemm)
    return (loss, h_pos, h_neg, g_pos, g_neg), grads


# ---- ffkernels_triton::ff_grad_labeled --------------------------------------------------------------------------

def ff_grad_labeled(x: Tensor, label_pos: Tensor, label_neg: Tensor, num_classes: int, label_value: float,
                    weight: Tensor, bias: Optional[Tensor], peer_mean: Optional[Tensor],
                    options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """loss, h_pos, h_neg, g_pos, g_neg, grad_weight, grad_bias (empty without bias) of the pair
    (x with label_pos, x with label_neg written in); nothing is updated (peer_mean is only read)."""
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    x, y_pos, y_neg = _check_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, in_place=False)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    peer_mean = _check_peer_mean(peer_mean, weight, cfg, in_place=False)
    outs, (grad_w, grad_b) = _run(x, y_pos, y_neg, num_classes, label_value, weight, bias, cfg, peer_mean, NO_UPDATE,
                                  (None, None, None, None))
    return (*outs, grad_w, grad_b if grad_b is not None else weight.new_empty(0))


def _ff_grad_labeled_fake(x, label_pos, label_neg, num_classes, label_value, weight, bias, peer_mean, options):
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    _check_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, in_place=False)
    _check_peer_mean(peer_mean, weight, cfg, in_place=False)
    return contract.grad_outputs_like(x, weight, bias)


# ---- ffkernels_triton::ff_step_labeled --------------------------------------------------------------------------

def ff_step_labeled(x: Tensor, label_pos: Tensor, label_neg: Tensor, num_classes: int, label_value: float,
                    weight: Tensor, bias: Optional[Tensor], state1_weight: Optional[Tensor],
                    state2_weight: Optional[Tensor], state1_bias: Optional[Tensor], state2_bias: Optional[Tensor],
                    peer_mean: Optional[Tensor], step: int,
                    options: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused labeled step: outputs with the weights before the update, which kernel 3 applies in place; skipped
    on the device when the loss is not finite (peer_mean <- r' likewise)."""
    states = (state1_weight, state2_weight, state1_bias, state2_bias)
    x, y_pos, y_neg, cfg, update, peer_mean = _step_args(x, label_pos, label_neg, num_classes, label_value, weight,
                                                         bias, states, peer_mean, step, options)
    outs, _ = _run(x, y_pos, y_neg, num_classes, label_value, weight, bias, cfg, peer_mean, update, states)
    return outs


def _step_args(x, label_pos, label_neg, num_classes, label_value, weight, bias, states, peer_mean, step, options):
    cfg = FFConfig.from_op_options(options)
    _check_gemm(cfg, weight)
    contract.check_step(step)
    x, y_pos, y_neg = _check_labeled(x, label_pos, label_neg, num_classes, label_value, weight, bias, in_place=True)
    _check_all_states(weight, bias, states, cfg)
    peer_mean = _check_peer_mean(peer_mean, weight, cfg, in_place=True)
    return x, y_pos, y_neg, cfg, optim_args(step, cfg), peer_mean


def _ff_step_labeled_fake(x, label_pos, label_neg, num_classes, label_value, weight, bias, s1w, s2w, s1b, s2b,
                          peer_mean, step, options):
    _step_args(x, label_pos, label_neg, num_classes, label_value, weight, bias, (s1w, s2w, s1b, s2b), peer_mean,
               step, options)
    return contract.step_outputs_like(x, weight)


ff_grad_labeled_op = _register("ff_grad_labeled", ff_grad_labeled, (), _ff_grad_labeled_fake)
ff_step_labeled_op = _register("ff_step_labeled", ff_step_labeled, _PARAMS_AND_STATE + ("peer_mean",),
                               _ff_step_labeled_fake)
