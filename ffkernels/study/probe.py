"""Linear probes: multinomial logistic regression on frozen features, in torch. Two of them:

- ``lbfgs`` (``fit_linear_probe``): features standardized per dimension with the *training* split's mean and
  standard deviation (``Standardizer``), full-batch L-BFGS (strong-Wolfe line search) from zero weights for a
  fixed number of iterations with an L2 penalty on the weights. Convex with a fixed start: deterministic for
  given data, and close to the best linear read-out whatever the features' scale.
- ``paper`` (``fit_adam_probe``): the paper's protocol as far as it is known: a linear classifier on the *raw*
  frozen features, trained with Adam for a fixed number of epochs of shuffled minibatches (nn.Linear's
  initialization, no penalty). It depends on the features' scale, as the paper's numbers do.
- ``scff`` (``SCFF_PROBE``): SCFF's own read-out (Chen et al., official code): each layer's features standardized
  per sample (zero mean, unit std over its units), layers concatenated, dropout 0.2, one linear layer, Adam 1e-3
  for 50 epochs of batches of 64, the lr halved at 20, 35, 50, 60, 70, 80 and 90% of the epochs.

Both run on whatever device the features are on.
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


SCFF_PROBE = dict(epochs=50, lr=1e-3, batch_size=64, dropout=0.2,
                  halve_at=tuple(int(50 * r) for r in (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9)))


def fit_adam_probes(xs: list, y: torch.Tensor, num_classes: int, epochs: int, lr: float, batch_size: int,
                    seed: int, dropout: float = 0.0, halve_at=()) -> list:
    """One linear classifier per feature tensor of ``xs`` (each (n, d_i), raw), trained side by side: each
    starts from nn.Linear's initialization drawn from ``torch.Generator().manual_seed(seed)`` and takes
    ``epochs`` epochs of Adam (``lr``) over the same minibatches of ``batch_size``, in an order drawn from
    ``manual_seed(seed + 1)``. The classifiers share nothing but the batch order (separate losses, separate
    parameters, element-wise Adam), so each is exactly what it would be trained alone; together they cost one
    autograd graph and one optimizer step per batch instead of one per classifier. ``dropout``: inverted dropout
    on the classifiers' input while training (masks from ``manual_seed(seed + 2)``); ``halve_at``: the epochs (0-based,
    counted as done) after which the lr is halved."""
    if not xs:
        raise ValueError("ffkernels: the Adam probe needs at least one feature tensor")
    for x in xs:
        _check(x, y, num_classes)
        if len(x) != len(xs[0]) or x.device != xs[0].device:
            raise ValueError("ffkernels: the Adam probes' features must have the same rows on the same device")
    if epochs < 1 or batch_size < 1 or not lr > 0 or not 0 <= dropout < 1:
        raise ValueError(f"ffkernels: the Adam probe needs epochs >= 1, batch_size >= 1, lr > 0 and dropout in [0, 1), "
                         f"got {epochs}, {batch_size}, {lr}, {dropout}")
    xs = [x.float() for x in xs]
    device = xs[0].device
    y = y.to(device).long()
    params = []
    for x in xs:
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / x.shape[1] ** 0.5  # nn.Linear's default initialization, from our generator
        w = (torch.rand(num_classes, x.shape[1], generator=g) * 2 - 1) * bound
        b = (torch.rand(num_classes, generator=g) * 2 - 1) * bound
        params.append((w.to(device).requires_grad_(), b.to(device).requires_grad_()))
    opt = torch.optim.Adam([t for wb in params for t in wb], lr=lr)
    order = torch.Generator().manual_seed(seed + 1)
    masks = torch.Generator().manual_seed(seed + 2)

    def dropped(t):
        if not dropout:
            return t
        keep = (torch.rand(t.shape, generator=masks) >= dropout).to(t.device, t.dtype)
        return t * keep / (1 - dropout)

    with torch.enable_grad():
        for epoch in range(epochs):
            for idx in torch.randperm(len(y), generator=order).to(device).split(batch_size):
                opt.zero_grad(set_to_none=True)
                sum(F.cross_entropy(F.linear(dropped(x[idx]), w, b), y[idx]) for x, (w, b) in zip(xs, params)).backward()
                opt.step()
            if epoch + 1 in halve_at:
                for group in opt.param_groups:
                    group["lr"] *= 0.5
    with torch.no_grad():
        return [LinearProbe(w.detach(), b.detach(), float(F.cross_entropy(F.linear(x, w, b), y)))
                for x, (w, b) in zip(xs, params)]


def fit_adam_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, lr: float, batch_size: int,
                   seed: int) -> LinearProbe:
    """One linear classifier on raw features ``x``, trained as ``fit_adam_probes`` trains each of its own."""
    return fit_adam_probes([x], y, num_classes, epochs, lr, batch_size, seed)[0]


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   num_classes: int, steps: int = PROBE_STEPS, weight_decay: float = PROBE_WEIGHT_DECAY) -> float:
    """Test accuracy of a linear probe fit on standardized training features (test standardized alike)."""
    std = Standardizer.fit(x_train)
    probe = fit_linear_probe(std(x_train), y_train, num_classes, steps, weight_decay)
    return probe.accuracy(std(x_test), y_test)
