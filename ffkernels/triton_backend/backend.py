"""TritonBackend: the ``backend="triton"`` entry of ffkernels.backends, on top of the torch.library ops."""
from __future__ import annotations

import torch

from .._types import FFGradOutput, FFStepOutput
from ..config import FFConfig
from . import settings


def _state_slots(states) -> list:
    """The ops' two state slots of one parameter, None where this optimizer keeps less."""
    return list(states) + [None] * (2 - len(states))


class TritonBackend:
    """grad / update / step of shared/DESIGN.md with the Triton kernels (see docs/triton.md)."""

    name = "triton"

    def __init__(self):
        from . import ops  # noqa: F401  (registers torch.ops.ffkernels_triton)

        self.dtypes = settings.supported_dtypes()
        self.ops = torch.ops.ffkernels_triton

    def grad(self, x_pos, x_neg, weight, bias, cfg: FFConfig) -> FFGradOutput:
        r = self.ops.ff_grad(x_pos, x_neg, weight, bias, *cfg.loss_args())
        return FFGradOutput(*r[:6], r[6] if bias is not None else None)

    def update(self, weight, bias, grad_w, grad_b, st_w, st_b, step, cfg: FFConfig, loss=None) -> None:
        sb = _state_slots(st_b) if bias is not None else [None, None]
        self.ops.ff_update(weight, bias, grad_w, grad_b, *_state_slots(st_w), *sb, loss, int(step),
                           *cfg.optim_args())

    def step(self, x_pos, x_neg, weight, bias, st_w, st_b, step, cfg: FFConfig) -> FFStepOutput:
        sb = _state_slots(st_b) if bias is not None else [None, None]
        r = self.ops.ff_step(x_pos, x_neg, weight, bias, *_state_slots(st_w), *sb, int(step), *cfg.loss_args(),
                             *cfg.optim_args())
        return FFStepOutput(*r)
