"""Frozen features of a trained network, layer by layer, for the probe, the metrics and the t-SNE maps.

FF: every input gets the *neutral* label (``ffkernels.labels.embed_neutral``: each of the pretext task's
label slots set to 1/num_labels, so no label is preferred) before ``FFNet.features``.
BP: ``BPMLP.features`` of the plain input (the BP network never sees label slots).
"""
from __future__ import annotations

import torch

from ..labels import embed_neutral
from ..net import FFNet
from ..bp import BPMLP

FEATURE_BATCH = 1000


def _device_dtype(model: torch.nn.Module):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def ff_features(net: FFNet, x: torch.Tensor, num_labels, batch_size: int = FEATURE_BATCH) -> list:
    """Per layer, the (n, width) activations of ``x`` with the neutral label of ``num_labels`` written in
    (``num_labels=None``: ``x`` as it is, for a net trained without labels)."""
    device, dtype = _device_dtype(net)
    chunks = [net.features(xb.to(device, dtype) if num_labels is None else embed_neutral(xb.to(device, dtype), num_labels))
              for xb in x.split(batch_size)]
    return [torch.cat(layer) for layer in zip(*chunks)]


@torch.no_grad()
def bp_features(model: BPMLP, x: torch.Tensor, batch_size: int = FEATURE_BATCH) -> list:
    """Per layer, the (n, width) activations of ``x`` (the head is not a feature layer)."""
    device, dtype = _device_dtype(model)
    chunks = [model.features(xb.to(device, dtype)) for xb in x.split(batch_size)]
    return [torch.cat(layer) for layer in zip(*chunks)]


@torch.no_grad()
def pair_wins(net: FFNet, x_pos: torch.Tensor, x_neg: torch.Tensor, batch_size: int = FEATURE_BATCH) -> float:
    """The fraction of pairs whose positive has more goodness (summed over ``net.predict_layers``) than its negative:
    the pretext accuracy of the label-free tasks (hybrid, scff)."""
    device, dtype = _device_dtype(net)
    wins = 0
    for xp, xn in zip(x_pos.split(batch_size), x_neg.split(batch_size)):
        g = [net.goodness(t.to(device, dtype))[:, net.predict_layers].sum(-1) for t in (xp, xn)]
        wins += int((g[0] > g[1]).sum())
    return wins / max(1, len(x_pos))
