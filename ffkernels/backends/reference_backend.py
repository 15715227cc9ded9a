"""The ``reference`` backend: the oracles (``reference.py`` for the linear step, ``reference_conv.py`` for the conv step)
behind the backend interface of ``backends/__init__.py``."""
from __future__ import annotations

import torch

from .._types import FFGradOutput, FFStepOutput
from ..config import FFConfig
from .contract import check_peer_mean
from .reference import ff_grad, ff_grad_peer, optimizer_update
from .reference_conv import conv_grad, conv_step


class ReferenceBackend:
    """grad / update / step of docs/design.md with autograd + torch.optim: the oracle as a backend."""

    name = "reference"
    dtypes = None  # any floating dtype
    gemm_dtypes = ("param", "bfloat16", "float16")  # FFConfig.gemm_dtype: autocast defines the expected math here

    def unavailable_reason(self):
        return None

    def device_reason(self, device: torch.device):
        return None

    def grad(self, x_pos, x_neg, weight, bias, cfg: FFConfig, peer_mean=None) -> FFGradOutput:
        return ff_grad(x_pos, x_neg, weight, bias, cfg, peer_mean)

    def update(self, weight, bias, grad_w, grad_b, st_w, st_b, step, cfg: FFConfig, loss=None) -> None:
        if loss is not None and not bool(torch.isfinite(loss).all()):
            return
        triples = [(weight, grad_w, st_w)] + ([(bias, grad_b, st_b)] if bias is not None else [])
        params, grads, states = (list(t) for t in zip(*triples))
        optimizer_update(params, grads, states, step, cfg)

    def conv_grad(self, x_pos, x_neg, target, weight, bias, geom, num_classes, cfg: FFConfig) -> FFGradOutput:
        return conv_grad(x_pos, x_neg, target, weight, bias, geom, cfg, num_classes)

    def conv_step(self, x_pos, x_neg, target, weight, bias, st_w, st_b, step, geom, num_classes,
                  cfg: FFConfig) -> FFStepOutput:
        return conv_step(x_pos, x_neg, target, weight, bias, st_w, st_b, step, geom, cfg, num_classes)

    def step(self, x_pos, x_neg, weight, bias, st_w, st_b, step, cfg: FFConfig, peer_mean=None) -> FFStepOutput:
        check_peer_mean(peer_mean, weight, cfg, in_place=True)
        g, r_new = ff_grad_peer(x_pos, x_neg, weight, bias, cfg, peer_mean)
        self.update(weight, bias, g.grad_weight, g.grad_bias, st_w, st_b, step, cfg, loss=g.loss)
        if r_new is not None and bool(torch.isfinite(g.loss)):
            peer_mean.copy_(r_new)
        return FFStepOutput(*g[:5])
