"""Shared test helpers: run a backend and the reference oracle side by side and compare."""
from __future__ import annotations

import torch

from ffkernels import FFLinear, embed_label, wrong_labels
from ffkernels.backends.reference import FFLayerRef


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are all zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_rel(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:.3g}"


def make_pair(backend, K, N, bias, dtype, seed=0, **cfg):
    torch.manual_seed(seed)
    layer = FFLinear(K, N, bias=bias, backend=backend, dtype=dtype, **cfg)
    oracle = FFLayerRef(layer.weight, layer.bias, layer.config)
    return layer, oracle


def state_pairs(layer: FFLinear, oracle: FFLayerRef):
    """(name, ours, torch.optim's) for every optimizer state tensor."""
    out = []
    for pname in ("weight", "bias"):
        p = getattr(oracle, pname)
        if p is None:
            continue
        st = oracle.state_of(p)
        for s in layer.config.state_names:
            if s in st and st[s] is not None:
                out.append((f"{s}_{pname}", getattr(layer, f"{s}_{pname}"), st[s]))
    return out


def run_and_compare(backend, B, K, N, *, steps=3, bias=True, dtype=torch.float32, tol=None, seed=0,
                    labeled_classes=None, label_value=1.0, **cfg):
    """Train ``steps`` steps with ``backend`` and with the oracle on the same data; compare everything.

    float64: the backend must match the float64 oracle to ``tol`` (1e-11 relative).
    float32 (and lower): against a float64 oracle fed the same rounded inputs and initial weights, the
    backend's error may be at most 4x the same-precision oracle's own error, plus ``tol`` (1e-5 relative
    for float32). The allowance matters where Adam divides a gradient that is mostly rounding noise by
    its own magnitude (first steps, gradients near eps): two correct fp32 implementations then differ
    by more than 1e-5, and the fp32 oracle shows by how much.
    With ``labeled_classes=C`` the backend runs FFLinear.ff_step_labeled(x, y_pos, y_neg, C) and the oracle
    the explicit pair embed_label(x, y_pos), embed_label(x, y_neg).
    """
    exact = dtype == torch.float64
    tol = tol if tol is not None else {torch.float64: 1e-11, torch.float32: 1e-5}.get(dtype, 1e-2)
    layer, oracle = make_pair(backend, K, N, bias, dtype, seed=seed, **cfg)
    oracle64 = None if exact else FFLayerRef(layer.weight.double(), None if layer.bias is None else layer.bias.double(),
                                             oracle.cfg)
    gen = torch.Generator().manual_seed(seed + 1)

    def check(what, ours, ref, ref64):
        if exact:
            assert_rel(ours, ref, tol, what)
            return
        e_ours, e_ref = rel_err(ours, ref64), rel_err(ref, ref64)
        assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref64.shape)}"
        assert e_ours <= 4 * e_ref + tol, f"{what}: error vs fp64 {e_ours:.3g} > 4 * {e_ref:.3g} (oracle) + {tol:g}"

    for step in range(steps):
        xp = torch.randn(B, K, generator=gen, dtype=torch.float64)
        xn = torch.randn(B, K, generator=gen, dtype=torch.float64)
        if K == 1:  # normalized, a 1-feature row is just its sign: keep pos and neg apart, else the true
            xp, xn = xp.abs(), -xn.abs()  # gradient can be 0 and Adam would amplify rounding noise to +-lr
        xp, xn = xp.to(dtype), xn.to(dtype)
        if labeled_classes:
            y_pos = torch.randint(0, labeled_classes, (B,), generator=gen)
            y_neg = wrong_labels(y_pos, labeled_classes, gen)
            ours = layer.ff_step_labeled(xp, y_pos, y_neg, labeled_classes, label_value)
            xp, xn = (embed_label(xp, y, labeled_classes, label_value) for y in (y_pos, y_neg))
        else:
            ours = layer.ff_step(xp, xn)
        ref = oracle.step(xp, xn)
        ref64 = oracle64.step(xp.double(), xn.double()) if oracle64 is not None else ref
        for name, a, b, c in zip(ours._fields, ours, ref, ref64):
            check(f"step {step} {name}", a, b, c)
        for pname in ("weight", "bias") if bias else ("weight",):
            check(f"step {step} {pname}", getattr(layer, pname).detach(), getattr(oracle, pname).detach(),
                  getattr(oracle64 or oracle, pname).detach())
        states64 = {n: b for n, _, b in state_pairs(layer, oracle64 or oracle)}
        for name, a, b in state_pairs(layer, oracle):
            check(f"step {step} {name}", a, b, states64[name])
    assert layer.step_count == steps
    return layer, oracle
