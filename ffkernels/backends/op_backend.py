"""OpBackend: a backend whose fused FF ops are registered in one ``torch.ops`` namespace.

The compiled backends (``torch.ops.ffkernels``) and the Triton backend (``torch.ops.ffkernels_triton``)
register the same op schemas (docs/design.md, "The ops"), so one class calls either: the options cross as
one string (``FFConfig.op_options``), the optimizer state as two optional slots per parameter, and the running
mean of peer normalization as one optional slot (``peer_mean``: read by ff_grad, updated in place by ff_step).
"""
from __future__ import annotations

import torch

from .._types import FFGradOutput, FFStepOutput
from ..config import FFConfig
from .contract import check_gemm_dtype, state_slots


class OpBackend:
    """grad / update / step through ``torch.ops.<namespace>``; ``step_labeled`` where the ops include it."""

    gemm_dtypes = ("param",)  # the FFConfig.gemm_dtype values its ops run (autocast); others are refused here

    def __init__(self, name: str, namespace: str, labeled: bool = False, gemm_dtypes=("param",)):
        self.name, self.namespace, self.gemm_dtypes = name, namespace, tuple(gemm_dtypes)
        if labeled:
            self.step_labeled = self._step_labeled

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
