"""The oracle (backends/reference.py) against the math as docs/design.md writes it ("The math", "Peer
normalization"), in float64, independently of the oracle's code.

Every kernel is checked against the oracle; this file checks the oracle against the formulas, so a misreading the
oracle and a kernel share (hinton's 1/(2B), symba's alpha, mean vs sum goodness, the norm's eps outside the square
root, the peer term, Adam's bias correction) fails here. Three independent checks over the whole option grid
(norm x goodness x loss x bias x peer normalization off/on, non-default threshold, alpha and eps):

- closed forms written out below from the design's formulas (not the oracle's helpers): x-hat, h, g, the loss and the
  exact gradient dL/dg -> c_i -> dW, db, the peer term v;
- central differences of the closed-form loss against the oracle's autograd gradient (with the peer term, where every
  z+ > 0, so that its straight-through derivative is the true one);
- torch.optim's Adam and SGD (how the oracle updates) against the update rules written out, first and later steps.
Tolerances: tolerance.FORMULA (1e-13 relative, the same sums in another order) and CENTRAL_DIFFERENCES (1e-7).
"""
import itertools
import math

import pytest
import torch

import oracle
from ffkernels import FFConfig
from tolerance import CENTRAL_DIFFERENCES, FORMULA, check

F64 = torch.float64
NORMS, GOODNESS, LOSSES = ("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba", "scff")
PEER = dict(peer_norm=0.7, peer_momentum=0.6)


def grid():
    """(id, FFConfig, bias) over norm x goodness x loss x bias x peer off/on; threshold, alpha, eps non-default, and
    scff's two thresholds apart and its penalty on."""
    out = []
    for norm, good, loss, bias, peer in itertools.product(NORMS, GOODNESS, LOSSES, (True, False), (False, True)):
        th = 1.7 if good == "sum" else 0.4
        kw = dict(norm=norm, goodness=good, loss=loss, norm_eps=0.1, threshold=th, symba_alpha=2.5,
                  **(dict(threshold_neg=1.6 * th, scff_lambda=0.3) if loss == "scff" else {}),
                  **(PEER if peer else {}))
        cid = f"{norm}-{good}-{loss}-{'bias' if bias else 'nobias'}{'-peer' if peer else ''}"
        out.append(pytest.param(FFConfig(**kw), bias, id=cid))
    return out


def data(seed, B=6, K=5, N=4, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    xp = torch.randn(B, K, generator=g, dtype=F64) + 0.5
    xn = 1.5 * torch.randn(B, K, generator=g, dtype=F64)
    w = torch.randn(N, K, generator=g, dtype=F64)
    b = torch.randn(N, generator=g, dtype=F64) + shift
    r = torch.rand(N, generator=g, dtype=F64)
    return xp, xn, w, b, r


# ---- the design's formulas, written out ------------------------------------------------------------------------

def x_hat(x, cfg):
    """rms: x / (sqrt(sum_k x_k^2 / K) + eps); l2: x / (sqrt(sum_k x_k^2) + eps); none: x."""
    K = x.shape[1]
    if cfg.norm == "none":
        return x
    ss = (x * x).sum(1, keepdim=True)
    return x / (torch.sqrt(ss / K if cfg.norm == "rms" else ss) + cfg.norm_eps)


def softplus(t):
    """log(1 + e^t) exactly (no linearization above 20): t + log1p(e^-t) for t > 0, else log1p(e^t)."""
    return torch.where(t > 0, t + torch.log1p(torch.exp(-t.abs())), torch.log1p(torch.exp(-t.abs())))


def sigmoid(t):
    return 1.0 / (1.0 + torch.exp(-t))


def by_hand(xp, xn, w, b, cfg, r=None):
    """(loss, h_pos, h_neg, g_pos, g_neg, dW, db, r') from the formulas of docs/design.md."""
    B, N = xp.shape[0], w.shape[0]
    s = 1.0 if cfg.goodness == "sum" else 1.0 / N
    xhp, xhn = x_hat(xp, cfg), x_hat(xn, cfg)
    zp, zn = xhp @ w.T, xhn @ w.T
    if b is not None:
        zp, zn = zp + b, zn + b
    hp, hn = zp.clamp_min(0), zn.clamp_min(0)
    gp, gn = s * (hp * hp).sum(1), s * (hn * hn).sum(1)
    th, a = cfg.threshold, cfg.symba_alpha
    if cfg.loss == "hinton":
        loss = (softplus(th - gp).sum() + softplus(gn - th).sum()) / (2 * B)
        dgp, dgn = -sigmoid(th - gp) / (2 * B), sigmoid(gn - th) / (2 * B)
    elif cfg.loss == "scff":  # theta+ = threshold, theta- = threshold_neg, + lambda |g+| per pair
        thn, lam = cfg.threshold_neg, cfg.scff_lambda
        loss = (softplus(th - gp).sum() + softplus(gn - thn).sum() + lam * gp.abs().sum()) / (2 * B)
        dgp, dgn = (-sigmoid(th - gp) + lam * torch.sign(gp)) / (2 * B), sigmoid(gn - thn) / (2 * B)
    else:
        ai = -a * (gp - gn)
        loss = softplus(ai).sum() / B
        dgp, dgn = -a * sigmoid(ai) / B, a * sigmoid(ai) / B
    dzp, dzn = (2 * s * dgp)[:, None] * hp, (2 * s * dgn)[:, None] * hn  # c_i h_i
    r_new = None
    if cfg.peer_norm:
        lam, mu = cfg.peer_norm, cfg.peer_momentum
        m = hp.sum(0) / B
        r_new = mu * r + (1 - mu) * m
        r_bar = r_new.sum() / N
        loss = loss + lam * ((r_bar - r_new) ** 2).sum() / N
        dzp = dzp + (lam * (2 / N) * (r_new - r_bar) * (1 - mu) / B)[None, :]  # every positive row, any sign of z
    dw = dzp.T @ xhp + dzn.T @ xhn
    db = dzp.sum(0) + dzn.sum(0) if b is not None else None
    return loss, hp, hn, gp, gn, dw, db, r_new


# ---- the oracle against them -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,bias", grid())
def test_oracle_equals_the_closed_forms(cfg, bias):
    """loss, h, g, dW, db and r' of the oracle equal the design's formulas written out."""
    for seed in (0, 1):
        xp, xn, w, b, r = data(seed)
        b = b if bias else None
        r_in = r if cfg.peer_norm else None
        out, r_new = oracle.ff_grad_peer(xp, xn, w, b, cfg, r_in)
        want = by_hand(xp, xn, w, b, cfg, r)
        names = ("loss", "h_pos", "h_neg", "g_pos", "g_neg", "grad_weight", "grad_bias")
        for name, got, exp in zip(names, out, want):
            if exp is None:
                assert got is None, name
            else:
                check(f"seed {seed} {name}", got, exp, exp, FORMULA)
        if cfg.peer_norm:
            check(f"seed {seed} r'", r_new, want[7], want[7], FORMULA)
        else:
            assert r_new is None
        assert bool((out.h_pos == 0).any() or (out.h_neg == 0).any()), "the data should switch some unit off"


@pytest.mark.parametrize("cfg,bias", grid())
def test_oracle_gradient_is_the_derivative_of_the_written_loss(cfg, bias):
    """Central differences (step 1e-6) of the closed-form loss against the oracle's gradient. With the peer term the
    biases are shifted (or, without bias, x+ and W made positive) so that every z+ > 0: there its straight-through
    derivative is the true one."""
    xp, xn, w, b, r = data(2, B=4, K=3, N=5, shift=6.0 if cfg.peer_norm else 0.0)
    if cfg.peer_norm and not bias:  # no bias to shift: positive rows and weights keep z+ > 0
        xp, w = xp.abs() + 0.1, w.abs() + 0.1
    b = b if bias else None
    out = oracle.ff_grad(xp, xn, w, b, cfg, r if cfg.peer_norm else None)
    if cfg.peer_norm:
        assert (x_hat(xp, cfg) @ w.T + (b if b is not None else 0)).min() > 0

    def loss(w_, b_):
        return float(by_hand(xp, xn, w_, b_, cfg, r)[0])

    fd_w = oracle.central_difference(lambda w_: loss(w_, b), w)
    check("grad_weight", out.grad_weight, fd_w, fd_w, CENTRAL_DIFFERENCES)
    assert fd_w.abs().max() > 1e-3, "a gradient this small would check nothing"
    if bias:
        fd_b = oracle.central_difference(lambda b_: loss(w, b_), b)
        check("grad_bias", out.grad_bias, fd_b, fd_b, CENTRAL_DIFFERENCES)


def test_softplus_is_exact_above_20():
    """The loss uses log(1 + e^t) exactly, also where F.softplus would return t (t > 20, where the two differ by
    e^-t ~ 1e-9 relative, 1e4 times FORMULA's tolerance): symba with x- scaled so that one row has t = 22."""
    xp, xn, w, _, _ = data(3)
    cfg = FFConfig(norm="none", loss="symba", symba_alpha=4.0)
    gp, gn = by_hand(xp, xn, w, None, cfg)[3:5]  # no bias, no norm: g- scales with the square of x-
    i = int(gn.argmax())
    xn = xn * math.sqrt((22.0 / cfg.symba_alpha + float(gp[i])) / float(gn[i]))
    want = by_hand(xp, xn, w, None, cfg)
    t = -cfg.symba_alpha * (want[3] - want[4])
    assert 21.9 < float(t.max()) < 22.1
    out = oracle.ff_grad(xp, xn, w, None, cfg)
    check("loss", out.loss, want[0], want[0], FORMULA)
    check("grad_weight", out.grad_weight, want[5], want[5], FORMULA)


def test_goodness_mean_is_sum_over_n_and_hinton_halves_over_2b():
    """The two scalings the losses are most easily misread by, spelled out on one example: mean goodness is sum / N,
    and hinton's loss with g- = g+ and threshold t is softplus(t - g) + softplus(g - t) over 2 (the 1/(2B))."""
    xp, _, w, b, _ = data(4)
    N = w.shape[0]
    s = oracle.ff_grad(xp, xp, w, b, FFConfig(goodness="sum", threshold=2.0))
    m = oracle.ff_grad(xp, xp, w, b, FFConfig(goodness="mean", threshold=2.0))
    check("g mean", m.g_pos, s.g_pos / N, s.g_pos / N, FORMULA)
    want = (softplus(2.0 - s.g_pos) + softplus(s.g_pos - 2.0)).mean() / 2
    check("hinton loss", s.loss, want, want, FORMULA)


# ---- the optimizer -----------------------------------------------------------------------------------------------

OPTIM = {
    "adam": dict(optimizer="adam", lr=3e-3),
    "adam-wd": dict(optimizer="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    "sgd": dict(optimizer="sgd", lr=0.05),
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9),
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.02, momentum=0.5, weight_decay=0.1),
}


def update_by_hand(p, g, state, step, cfg):
    """docs/design.md's update rules: (new p, new state)."""
    g = g + cfg.weight_decay * p
    if cfg.optimizer == "adam":
        b1, b2 = cfg.betas
        m, v = state
        m = m + (1 - b1) * (g - m)
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        return p - (cfg.lr / bc1) * m / (torch.sqrt(v) / math.sqrt(bc2) + cfg.eps), (m, v)
    if cfg.momentum == 0.0:
        return p - cfg.lr * g, ()
    buf = g if step == 1 else cfg.momentum * state[0] + g
    return p - cfg.lr * buf, (buf,)


@pytest.mark.parametrize("step", [1, 2, 5])
@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_update_equals_the_written_rules(name, step):
    cfg = FFConfig(**OPTIM[name])
    gen = torch.Generator().manual_seed(step)
    p, g = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    state = tuple(torch.rand(4, 3, generator=gen, dtype=F64) * (1e-3 if s == "exp_avg_sq" else 1e-1)
                  for s in cfg.state_names)
    want_p, want_state = update_by_hand(p, g, state, step, cfg)
    got_p, got_state = p.clone(), tuple(t.clone() for t in state)
    oracle.optimizer_update([got_p], [g.clone()], [got_state], step, cfg)
    check("param", got_p, want_p, want_p, FORMULA)
    assert (got_p - p).abs().max() > 1e-4, "the update should move the parameter"
    for s, a, e in zip(cfg.state_names, got_state, want_state):
        check(s, a, e, e, FORMULA)
