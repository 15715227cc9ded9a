"""The backprop baseline FF is compared with: the same MLP as an FFNet (normalize, Linear, ReLU per layer)
plus a linear head, trained end to end with cross-entropy and ``torch.optim.Adam``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backends.reference import layer_forward


class BPMLP(nn.Module):
    """The backprop baseline: the same MLP as an FFNet (normalize, Linear, ReLU per layer) + a linear head.

    Trained end to end with cross-entropy and ``torch.optim.Adam``. ``num_classes=None``: no head (the layers
    alone, e.g. trained end to end on FF's goodness loss, ``ffkernels.study.algos``).
    """

    def __init__(self, dims, num_classes: "int | None", norm: str = "rms", norm_eps: float = 1e-8, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"ffkernels: dims needs at least an input and one layer width, got {list(dims)}")
        kw = {"device": device, "dtype": dtype}
        self.norm, self.norm_eps = norm, norm_eps
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias, **kw) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes, **kw) if num_classes is not None else None

    def features(self, x) -> list:
        feats = []
        for layer in self.layers:
            x = layer_forward(x, layer.weight, layer.bias, self.norm, self.norm_eps)
            feats.append(x)
        return feats

    def forward(self, x):
        if self.head is None:
            raise ValueError("ffkernels: this BPMLP has no head (built with num_classes=None); use features()")
        return self.head(self.features(x)[-1])


def make_bp_optimizer(model: nn.Module, lr: float = 1e-3, **kw) -> torch.optim.Adam:
    """Adam over the BP model, using the fastest implementation torch offers on the model's device."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        kw.setdefault("fused", True)
    else:
        kw.setdefault("foreach", True)
    return torch.optim.Adam(model.parameters(), lr=lr, **kw)


def bp_step(model: BPMLP, optimizer: torch.optim.Optimizer, x, y) -> torch.Tensor:
    """One backprop training step with cross-entropy; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()
