"""OpBackend: a backend whose fused FF ops are registered in one ``torch.ops`` namespace.

The compiled backends (``torch.ops.ffkernels``) and the Triton backend (``torch.ops.ffkernels_triton``)
register the same op schemas (docs/design.md, "The ops"), so one class calls either: the options cross as
one string (``FFConfig.op_options``), the optimizer state as two optional slots per parameter, and the running
mean of peer normalization as one optional slot (``peer_mean``: read by ff_grad, updated in place by ff_step).
Backends whose namespace has the convolutional ops (``ff_conv_grad``, ``ff_conv_step``: ``conv=True``) also offer
``conv_grad`` / ``conv_step``, with ``FFConfig.conv_op_options``.
"""
from __future__ import annotations

import torch

from .._types import FFGradOutput, FFStepOutput
from ..config import FFConfig
from .contract import check_gemm_dtype, state_slots
from .contract_conv import check_conv_inputs


class OpBackend:
    """grad / update / step through ``torch.ops.<namespace>``; ``step_labeled`` and ``conv_grad`` / ``conv_step``
    where the ops include them."""

    gemm_dtypes = ("param",)  # the FFConfig.gemm_dtype values its ops run (autocast); others are refused here

    def __init__(self, name: str, namespace: str, labeled: bool = False, gemm_dtypes=("param",), conv: bool = False):
        self.name, self.namespace, self.gemm_dtypes = name, namespace, tuple(gemm_dtypes)
        if labeled:
            self.step_labeled = self._step_labeled
        if conv:
            self.conv_grad, self.conv_step = self._conv_grad, self._conv_step

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def grad(self, x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None) -> FFGradOutput:
        check_gemm_dtype(self, cfg)
        r = self.ops.ff_grad(x_pos, x_neg, weight, bias, peer_mean, cfg.op_options)
        return FFGradOutput(*r[:6], r[6] if bias is not None else None)

    def update(self, weight, bias, grad_w, grad_b, st_w, st_b, step, cfg: FFConfig, loss=None) -> None:
        self.ops.ff_update(weight, bias, grad_w, grad_b, *state_slots(st_w), *state_slots(st_b), loss, int(step),
                           cfg.op_options)

    def step(self, x_pos, x_neg, weight, bias, st_w, st_b, step, cfg: FFConfig, peer_mean=None) -> FFStepOutput:
        check_gemm_dtype(self, cfg)
        r = self.ops.ff_step(x_pos, x_neg, weight, bias, *state_slots(st_w), *state_slots(st_b), peer_mean,
                             int(step), cfg.op_options)
        return FFStepOutput(*r)

    def _step_labeled(self, x, label_pos, label_neg, num_classes, value, weight, bias, st_w, st_b, step,
                      cfg: FFConfig, peer_mean=None) -> FFStepOutput:
        """The supervised first layer: x with label_pos / label_neg written in, B-row GEMMs."""
        check_gemm_dtype(self, cfg)
        r = self.ops.ff_step_labeled(x, label_pos, label_neg, num_classes, value, weight, bias, *state_slots(st_w),
                                     *state_slots(st_b), peer_mean, int(step), cfg.op_options)
        return FFStepOutput(*r)

    def _conv_args(self, x_pos, x_neg, target, weight, bias, geom, num_classes, cfg: FFConfig) -> tuple:
        # the labels' range is the op's own check (in C++, before any work): no host read of it here
        check_conv_inputs(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes, check_range=False)
        check_gemm_dtype(self, cfg)
        return list(geom.stride), list(geom.padding), list(geom.dilation), int(geom.groups), int(num_classes or 0)

    def _conv_grad(self, x_pos, x_neg, target, weight, bias, geom, num_classes, cfg: FFConfig) -> FFGradOutput:
        """The convolutional FF gradient (``geom``: a ConvGeometry); h_neg, g_neg None for the competitive loss."""
        args = self._conv_args(x_pos, x_neg, target, weight, bias, geom, num_classes, cfg)
        r = self.ops.ff_conv_grad(x_pos, x_neg, target, weight, bias, *args, cfg.conv_op_options)
        neg = x_neg is not None
        return FFGradOutput(r[0], r[1], r[2] if neg else None, r[3], r[4] if neg else None, r[5],
                            r[6] if bias is not None else None)

    def _conv_step(self, x_pos, x_neg, target, weight, bias, st_w, st_b, step, geom, num_classes,
                   cfg: FFConfig) -> FFStepOutput:
        """The fused convolutional FF step (skipped when the loss is not finite); h_neg, g_neg None for competitive."""
        args = self._conv_args(x_pos, x_neg, target, weight, bias, geom, num_classes, cfg)
        r = self.ops.ff_conv_step(x_pos, x_neg, target, weight, bias, *state_slots(st_w), *state_slots(st_b), *args,
                                  int(step), cfg.conv_op_options)
        neg = x_neg is not None
        return FFStepOutput(r[0], r[1], r[2] if neg else None, r[3], r[4] if neg else None)
