"""Linear probe: multinomial logistic regression on frozen, standardized features, in torch.

Features are standardized per dimension with the *training* split's mean and standard deviation
(``Standardizer``); the probe is fit by full-batch L-BFGS (strong-Wolfe line search) from zero weights
for a fixed number of iterations with an L2 penalty on the weights. The problem is convex and the start is
fixed, so the result is deterministic for given data; it runs on whatever device the features are on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROBE_STEPS = 100
PROBE_WEIGHT_DECAY = 1e-3
STD_EPS = 1e-6


@dataclass
class Standardizer:
    """x -> (x - mean) / (std + eps), with mean and std of the features it was fit on."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Standardizer":
        x = x.float()
        return cls(x.mean(0), x.std(0, unbiased=False))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / (self.std + STD_EPS)


@dataclass
class LinearProbe:
    weight: torch.Tensor   # (classes, features): nn.Linear's layout, whose backward reads x row-major (fast)
    bias: torch.Tensor     # (classes,)
    final_loss: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.logits(x).argmax(1) == y.to(x.device)).float().mean()) if len(y) else 0.0


def _check(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"ffkernels: the probe needs features (n, d) and n labels with n > 0, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"ffkernels: probe labels must lie in [0, {num_classes}), got "
                         f"[{int(y.min())}, {int(y.max())}]")


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int = PROBE_STEPS,
                     weight_decay: float = PROBE_WEIGHT_DECAY) -> LinearProbe:
    """Minimize mean cross-entropy + weight_decay/2 * ||W||^2 over (W, b) with ``steps`` L-BFGS iterations."""
    _check(x, y, num_classes)
    if steps < 1 or weight_decay < 0:
        raise ValueError(f"ffkernels: probe steps must be >= 1 and weight_decay >= 0, got {steps}, {weight_decay}")
    x = x.float()
    y = y.to(x.device).long()
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, max_eval=2 * steps, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        return F.cross_entropy(F.linear(x, w, b), y) + 0.5 * weight_decay * w.pow(2).sum()

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        final = float(objective())
    return LinearProbe(w.detach(), b.detach(), final)


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   num_classes: int, steps: int = PROBE_STEPS, weight_decay: float = PROBE_WEIGHT_DECAY) -> float:
    """Test accuracy of a linear probe fit on standardized training features (test standardized alike)."""
    std = Standardizer.fit(x_train)
    probe = fit_linear_probe(std(x_train), y_train, num_classes, steps, weight_decay)
    return probe.accuracy(std(x_test), y_test)
