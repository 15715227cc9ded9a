"""The one place the tests import the oracle from: autograd + torch.optim, written plainly from the math.

Everything the tests compare a backend with comes through this module, so moving the oracle (e.g. to
ffkernels.backends.reference) is a one-line change here.

Peer normalization (docs/design.md, "Peer normalization"): ``ff_grad(..., peer_mean=r)`` includes L_peer and its
gradient; ``ff_grad_peer`` / ``ff_objective_peer`` also return the new running mean r' (None when it is off), which
the step commits after a finite loss; ``FFLayerRef(..., peer_mean=r)`` keeps r and commits it itself, and so does
``ff_step`` below.
"""
import itertools

import torch

from ffkernels import FFStepOutput
from ffkernels.backends.reference import (
    FFLayerRef,
    ff_grad,
    ff_grad_peer,
    ff_loss,
    ff_objective,
    ff_objective_peer,
    goodness,
    layer_forward,
    normalize,
    optimizer_update,
)

__all__ = ["FFLayerRef", "ff_grad", "ff_grad_peer", "ff_loss", "ff_objective", "ff_objective_peer", "ff_step",
           "goodness", "layer_forward", "normalize", "optimizer_update"]


def ff_step(x_pos, x_neg, weight, bias, state_weight, state_bias, step, cfg, peer_mean=None) -> FFStepOutput:
    """One step by the oracle on plain tensors, in place: the gradient by autograd, then, when the loss is finite,
    torch.optim's update of weight, bias and their state (``state_*``: the tensors named by cfg.state_names) and
    r <- r' (``peer_mean``, peer normalization). The outputs are from the weights before the update."""
    g, r_new = ff_grad_peer(x_pos, x_neg, weight, bias, cfg, peer_mean)
    if torch.isfinite(g.loss):
        n = 1 if bias is None else 2
        optimizer_update([weight, bias][:n], [g.grad_weight, g.grad_bias][:n],
                         [tuple(state_weight), tuple(state_bias or ())][:n], step, cfg)
        if r_new is not None:
            peer_mean.copy_(r_new)
    return FFStepOutput(*g[:5])


def central_difference(f, t: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """d f / d t by central differences, one element of ``t`` at a time (f: tensor -> float; float64 tensors)."""
    fd = torch.zeros_like(t)
    for idx in itertools.product(*map(range, t.shape)):
        tp, tm = t.clone(), t.clone()
        tp[idx] += h
        tm[idx] -= h
        fd[idx] = (f(tp) - f(tm)) / (2 * h)
    return fd
