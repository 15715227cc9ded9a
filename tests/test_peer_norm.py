"""Peer normalization (docs/design.md, "The math", "Peer normalization"): the oracle against the formula, the CPU
kernels (and the labeled first layer) against the oracle, lambda = 0 bit for bit, resume, the non-finite rule,
bad input, opcheck, and the refused split grad/update path.

lambda = peer_norm, mu = peer_momentum, B rows, N units, everything with the weights before the update:
  m_j = mean_i h+_ij,  r'_j = mu r_j + (1 - mu) m_j,  L_peer = lambda mean_j (mean(r') - r'_j)^2,
  dL/dz+_ij += v_j = lambda (2/N) (r'_j - mean(r')) (1 - mu) / B   for every unit, also where z <= 0.
"""
import copy
import itertools

import pytest
import torch
from helpers import rel_err

import ffkernels
from ffkernels import FFConfig, FFLinear, FFNet, NonFiniteLossError, embed_label, wrong_labels
from ffkernels.backends import get_backend
from ffkernels.backends import reference as ref
from ffkernels.backends.reference import FFLayerRef

HAVE_CPU = "cpu" in ffkernels.available_backends()
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="ffkernels._C is not built (see test_build.py)")
BACKENDS = ["reference"] + (["cpu"] if HAVE_CPU else [])

LAM, MU = 0.5, 0.7


def by_hand(x_pos, weight, bias, r, cfg):
    """r', L_peer and v from the formulas (not from the oracle's code)."""
    xh = ref.normalize(x_pos, cfg.norm, cfg.norm_eps)
    h = torch.relu(xh @ weight.T + (bias if bias is not None else 0))
    B, N = h.shape
    r_new = cfg.peer_momentum * r + (1 - cfg.peer_momentum) * h.mean(0)
    r_bar = r_new.mean()
    l_peer = cfg.peer_norm * ((r_bar - r_new) ** 2).sum() / N
    v = cfg.peer_norm * (2 / N) * (r_new - r_bar) * (1 - cfg.peer_momentum) / B
    return r_new, l_peer, v, xh


def tiny(seed=0, B=5, K=4, N=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xp, xn = torch.randn(B, K, generator=g, dtype=dtype), torch.randn(B, K, generator=g, dtype=dtype)
    w, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    r = torch.rand(N, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return xp, xn, w, b, r


# ---- the oracle against the formula ----------------------------------------------------------------------

@pytest.mark.parametrize("loss,goodness", [("hinton", "sum"), ("symba", "mean")])
def test_oracle_matches_the_formula(loss, goodness):
    xp, xn, w, b, r = tiny()
    cfg = FFConfig(peer_norm=LAM, peer_momentum=MU, loss=loss, goodness=goodness, threshold=2.0)
    b[0] = -100.0  # unit 0 is off for every row: only the straight-through peer term reaches it
    plain = ref.ff_grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    out, r_new = ref.ff_grad_peer(xp, xn, w, b, cfg, r)
    want_r, l_peer, v, xh = by_hand(xp, w, b, r, cfg)
    assert torch.all(out.h_pos[:, 0] == 0) and v[0] != 0
    torch.testing.assert_close(r_new, want_r, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.loss, plain.loss + l_peer, rtol=1e-14, atol=0)
    torch.testing.assert_close(out.grad_weight, plain.grad_weight + torch.outer(v, xh.sum(0)), rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(out.grad_bias, plain.grad_bias + xp.shape[0] * v, rtol=1e-13, atol=1e-16)
    assert torch.all(plain.grad_weight[0] == 0) and torch.all(out.grad_weight[0] != 0)
    for a, e in zip(out[1:5], plain[1:5]):  # h and g do not change
        assert torch.equal(a, e)
    assert not torch.equal(r, r_new)  # nothing written: r' is returned


def test_oracle_gradient_is_the_true_one_where_every_unit_is_on():
    """Central differences of the returned loss (L_ff + L_peer) where z+ > 0 everywhere, so the straight-through
    term is the true derivative there."""
    xp, xn, w, b, r = tiny(seed=1)
    b += 10.0
    cfg = FFConfig(peer_norm=3.0, peer_momentum=0.4, threshold=30.0)
    out = ref.ff_grad(xp, xn, w, b, cfg, r)
    assert (ref.normalize(xp, "rms", 1e-8) @ w.T + b).min() > 0

    def loss(w_, b_):
        return float(ref.ff_objective(xp, xn, w_, b_, cfg, r).loss)

    eps = 1e-6
    fd_w = torch.zeros_like(w)
    for idx in itertools.product(range(w.shape[0]), range(w.shape[1])):
        wp, wm = w.clone(), w.clone()
        wp[idx] += eps
        wm[idx] -= eps
        fd_w[idx] = (loss(wp, b) - loss(wm, b)) / (2 * eps)
    fd_b = torch.zeros_like(b)
    for j in range(b.shape[0]):
        bp, bm = b.clone(), b.clone()
        bp[j] += eps
        bm[j] -= eps
        fd_b[j] = (loss(w, bp) - loss(w, bm)) / (2 * eps)
    assert rel_err(out.grad_weight, fd_w) < 1e-7
    assert rel_err(out.grad_bias, fd_b) < 1e-7
    # and the peer part is not negligible in this case
    plain = ref.ff_grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    assert rel_err(plain.grad_weight, fd_w) > 1e-3


def test_oracle_requires_r_and_ignores_it_when_off():
    xp, xn, w, b, r = tiny()
    with pytest.raises(ValueError, match="needs peer_mean"):
        ref.ff_grad(xp, xn, w, b, FFConfig(peer_norm=0.1))
    off = FFConfig()
    a, e = ref.ff_grad(xp, xn, w, b, off, r), ref.ff_grad(xp, xn, w, b, off)
    assert all(torch.equal(x, y) for x, y in zip(a, e))


# ---- the CPU kernels against the oracle --------------------------------------------------------------------

def run_peer_compare(backend, B, K, N, *, steps=3, bias=True, dtype=torch.float64, labeled=None, seed=0, **cfg):
    """``steps`` steps with ``backend`` and with the oracle from the same weights and a random r; loss, h, g,
    weight, bias, every state tensor and r compared after every step (fp64: 1e-11; fp32: the rule of
    tests/helpers.py, at most 4x the fp32 oracle's own error against the fp64 oracle, plus 1e-5)."""
    cfg = {"peer_norm": LAM, "peer_momentum": MU, **cfg}
    exact = dtype == torch.float64
    tol = 1e-11 if exact else 1e-5
    torch.manual_seed(seed)
    layer = FFLinear(K, N, bias=bias, backend=backend, dtype=dtype, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.peer_mean.copy_(torch.rand(N, generator=gen, dtype=layer.peer_mean.dtype))
        layer.weight[0] = 0.0  # unit 0 is off in step 0 (z = 0 or < 0): only the peer term moves it
        if bias:
            layer.bias[0] = -1.0
    oracle = FFLayerRef(layer.weight, layer.bias, layer.config, peer_mean=layer.peer_mean)
    oracle64 = None if exact else FFLayerRef(layer.weight.double(), None if layer.bias is None else
                                             layer.bias.double(), layer.config, peer_mean=layer.peer_mean.double())

    def check(what, ours, want, want64):
        if exact:
            e = rel_err(ours, want)
            assert ours.shape == want.shape and e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"
            return
        e_ours, e_ref = rel_err(ours, want64), rel_err(want, want64)
        assert e_ours <= 4 * e_ref + tol, f"{what}: error vs fp64 {e_ours:.3g} > 4 * {e_ref:.3g} (oracle) + {tol:g}"

    for step in range(steps):
        xp = torch.randn(B, K, generator=gen, dtype=torch.float64)
        xn = torch.randn(B, K, generator=gen, dtype=torch.float64)
        if K == 1:
            xp, xn = xp.abs(), -xn.abs()
        xp, xn = xp.to(dtype), xn.to(dtype)
        if labeled:
            y_pos = torch.randint(0, labeled, (B,), generator=gen)
            y_neg = wrong_labels(y_pos, labeled, gen)
            ours = layer.ff_step_labeled(xp, y_pos, y_neg, labeled)
            xp, xn = (embed_label(xp, y, labeled) for y in (y_pos, y_neg))
        else:
            ours = layer.ff_step(xp, xn)
        want = oracle.step(xp, xn)
        want64 = oracle64.step(xp.double(), xn.double()) if oracle64 is not None else want
        for name, a, e, e64 in zip(ours._fields, ours, want, want64):
            check(f"step {step} {name}", a, e, e64)
        o64 = oracle64 or oracle
        check(f"step {step} peer_mean", layer.peer_mean, oracle.peer_mean, o64.peer_mean)
        for pname in ("weight", "bias") if bias else ("weight",):
            check(f"step {step} {pname}", getattr(layer, pname).detach(), getattr(oracle, pname).detach(),
                  getattr(o64, pname).detach())
            for s in layer.config.state_names:
                check(f"step {step} {s}_{pname}", getattr(layer, f"{s}_{pname}"),
                      oracle.state_of(getattr(oracle, pname))[s], o64.state_of(getattr(o64, pname))[s])
    assert layer.step_count == steps
    return layer, oracle


OPTIONS = [dict(loss=lo, goodness=go, **op) for lo, go, op in itertools.product(
    ("hinton", "symba"), ("sum", "mean"), (dict(optimizer="adam"), dict(optimizer="sgd", lr=1e-2, momentum=0.9)))]


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("fp64", "fp32"))
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
@pytest.mark.parametrize("B,N", list(itertools.product((1, 7, 64), (1, 17, 128))))
def test_cpu_step_matches_oracle(B, N, opt, dtype):
    K = (33, 1, 128)[(B + N + opt) % 3]
    run_peer_compare("cpu", B, K, N, dtype=dtype, bias=opt % 3 != 2, **OPTIONS[opt])


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("fp64", "fp32"))
@pytest.mark.parametrize("B,N", list(itertools.product((1, 7, 64), (1, 17, 128))))
def test_cpu_labeled_step_matches_oracle_on_the_pair(B, N, dtype):
    i = (B + N) % len(OPTIONS)
    run_peer_compare("cpu", B, 40, N, dtype=dtype, labeled=10, bias=i % 2 == 0, **OPTIONS[i])


@needs_cpu
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=("fp64", "fp32"))
@pytest.mark.parametrize("labeled", (False, True))
def test_cpu_grad_matches_oracle_with_a_dead_unit(dtype, labeled):
    """The gradient itself (Adam's first step would hide its scale): straight-through where z <= 0 included."""
    B, K, N = 9, 30, 13
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, K, generator=g, dtype=dtype)
    w, b = torch.randn(N, K, generator=g, dtype=dtype) / K ** 0.5, torch.randn(N, generator=g, dtype=dtype)
    b[2] = -50.0
    r = torch.rand(N, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    cfg = FFConfig(peer_norm=2.0, peer_momentum=0.3, threshold=float(N))
    yp = torch.randint(0, 10, (B,), generator=g)
    yn = wrong_labels(yp, 10, g)
    if labeled:
        xp, xn = embed_label(x, yp, 10), embed_label(x, yn, 10)
        ours = torch.ops.ffkernels.ff_grad_labeled(x, yp, yn, 10, 1.0, w, b, r, cfg.op_options)
    else:
        xp, xn = x, torch.randn(B, K, generator=g, dtype=dtype)
        ours = torch.ops.ffkernels.ff_grad(xp, xn, w, b, r, cfg.op_options)
    want = ref.ff_grad(xp, xn, w, b, cfg, r)
    want64 = ref.ff_grad(xp.double(), xn.double(), w.double(), b.double(), cfg, r.double())
    assert torch.all(want64.h_pos[:, 2] == 0) and torch.all(want64.grad_weight[2, 10:] != 0)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    for name, a, e, e64 in zip(want._fields, ours, want, want64):
        e_ours, e_ref = rel_err(a, e64), rel_err(e, e64)
        assert e_ours <= 4 * e_ref + tol, f"{name}: {e_ours:.3g} vs oracle {e_ref:.3g}"


@needs_cpu
def test_cpu_peer_terms_do_not_depend_on_the_thread_count():
    x, xn, w, b, r = tiny(seed=4, B=64, K=50, N=300, dtype=torch.float32)
    cfg = FFConfig(peer_norm=LAM, peer_momentum=MU).op_options
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.ffkernels.ff_grad(x, xn, w, b, r, cfg)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.ffkernels.ff_grad(x, xn, w, b, r, cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[3], many[3])


# ---- lambda = 0 changes nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labeled", (False, True))
def test_lambda_zero_is_bit_identical(backend, labeled):
    outs = []
    for kw in ({}, dict(peer_norm=0.0, peer_momentum=0.5)):
        torch.manual_seed(0)
        layer = FFLinear(40, 16, backend=backend, dtype=torch.float32, **kw)
        g = torch.Generator().manual_seed(1)
        seq = []
        for _ in range(3):
            x = torch.randn(8, 40, generator=g)
            if labeled:
                y = torch.randint(0, 10, (8,), generator=g)
                seq.append(layer.ff_step_labeled(x, y, wrong_labels(y, 10, g), 10))
            else:
                seq.append(layer.ff_step(x, torch.randn(8, 40, generator=g)))
        outs.append((seq, layer.state_dict()))
    (seq_a, sd_a), (seq_b, sd_b) = outs
    for a, b in zip(seq_a, seq_b):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert list(sd_a) == list(sd_b) and "peer_mean" not in sd_a
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if k != "_extra_state")


@needs_cpu
def test_lambda_zero_ignores_a_given_peer_mean_at_the_op_level():
    xp, xn, w, b, r = tiny(dtype=torch.float32)
    opts = FFConfig().op_options
    r0 = r.clone()
    a = torch.ops.ffkernels.ff_grad(xp, xn, w, b, r, opts)
    e = torch.ops.ffkernels.ff_grad(xp, xn, w, b, None, opts)
    assert all(torch.equal(x, y) for x, y in zip(a, e))
    st = [torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b)]
    torch.ops.ffkernels.ff_step(xp, xn, w, b, *st, r, 1, opts)
    assert torch.equal(r, r0)


# ---- FFLinear: the buffer, configure, resume ---------------------------------------------------------------

def test_layer_buffer_configure_and_repr():
    plain = FFLinear(6, 4)
    assert "peer_mean" not in plain.state_dict() and "peer_norm" not in repr(plain)
    layer = FFLinear(6, 4, peer_norm=0.2, peer_momentum=0.5)
    assert layer.config.peer_norm == 0.2 and layer.config.peer_momentum == 0.5
    assert torch.equal(layer.peer_mean, torch.zeros(4)) and "peer_mean" in layer.state_dict()
    assert "peer_norm=0.2" in repr(layer) and "peer_momentum=0.5" in repr(layer)
    plain.configure(peer_norm=0.1)
    assert torch.equal(plain.peer_mean, torch.zeros(4)) and "peer_mean" in plain.state_dict()
    plain.configure(peer_norm=0.0)
    assert "peer_mean" not in plain.state_dict()
    assert FFLinear(6, 4, peer_norm=0.1, dtype=torch.float64).peer_mean.dtype == torch.float64
    assert FFLinear(6, 4, peer_norm=0.1).half().peer_mean.dtype == torch.float32
    net = FFNet([6, 5, 3], peer_norm=0.1)
    assert all(layer.peer_mean.shape == (layer.out_features,) for layer in net.layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_r_updates_and_resets(backend):
    layer = FFLinear(12, 5, backend=backend, peer_norm=0.3, peer_momentum=0.6)
    x = torch.randn(6, 12)
    g_before = layer.ff_grad(x, -x)
    assert torch.equal(layer.peer_mean, torch.zeros(5))  # ff_grad only reads r
    out = layer.ff_step(x, -x)
    want = 0.4 * out.h_pos.mean(0)
    torch.testing.assert_close(layer.peer_mean, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, g_before.loss)
    layer.reset_optimizer_state()
    assert torch.equal(layer.peer_mean, torch.zeros(5)) and layer.step_count == 0


def test_nn_linear_state_dict_loads_into_a_peer_layer():
    lin = torch.nn.Linear(6, 4)
    layer = FFLinear(6, 4, peer_norm=0.1)
    layer.ff_step(torch.randn(3, 6), torch.randn(3, 6))
    layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.peer_mean, torch.zeros(4))
    assert layer.step_count == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labeled", (False, True))
def test_resume_mid_training_is_bit_exact(backend, labeled):
    def data(n):
        g = torch.Generator().manual_seed(7)
        out = []
        for _ in range(n):
            x = torch.randn(8, 30, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            out.append((x, y, wrong_labels(y, 10, g), torch.randn(8, 30, generator=g)))
        return out

    def train(layer, batches):
        res = []
        for x, y, yn, xn in batches:
            res.append(layer.ff_step_labeled(x, y, yn, 10) if labeled else layer.ff_step(x, xn))
        return res

    batches = data(6)
    torch.manual_seed(0)
    kw = dict(backend=backend, peer_norm=0.4, peer_momentum=0.8, optimizer="sgd", momentum=0.9, lr=0.01)
    a = FFLinear(30, 12, **kw)
    train(a, batches[:3])
    saved = copy.deepcopy(a.state_dict())
    assert not torch.equal(saved["peer_mean"], torch.zeros(12))
    tail_a = train(a, batches[3:])
    b = FFLinear(30, 12, **kw)
    b.load_state_dict(saved)
    tail_b = train(b, batches[3:])
    for oa, ob in zip(tail_a, tail_b):
        assert all(torch.equal(x, y) for x, y in zip(oa, ob))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "_extra_state") and a.step_count == b.step_count == 6


# ---- non-finite steps change nothing, r included ----------------------------------------------------------

def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if k != "_extra_state"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ("nan_input", "inf_r", "labeled_nan"))
def test_non_finite_loss_leaves_weights_state_and_r(backend, how):
    layer = FFLinear(20, 6, backend=backend, peer_norm=0.3)
    x = torch.randn(4, 20)
    layer.ff_step(x, -x)
    before = _snapshot(layer)
    assert not torch.equal(before["peer_mean"], torch.zeros(6))
    xp = x.clone()
    if how == "inf_r":  # only L_peer is non-finite
        with torch.no_grad():
            layer.peer_mean[1] = float("inf")
        before = _snapshot(layer)
    else:
        xp[0, 13] = float("nan")
    with pytest.raises(NonFiniteLossError):
        if how == "labeled_nan":
            layer.ff_step_labeled(xp, torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]), 4)
        else:
            layer.ff_step(xp, -x)
    after = _snapshot(layer)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert layer.step_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_functional_step_leaves_r(backend):
    xp, xn, w, b, r = tiny(dtype=torch.float32)
    xp[1, 2] = float("nan")
    cfg = FFConfig(peer_norm=0.3)
    st = lambda p: (torch.zeros_like(p), torch.zeros_like(p))  # noqa: E731
    w0, r0 = w.clone(), r.clone()
    out = ffkernels.ff_step(xp, xn, w, b, st(w), st(b), 1, cfg, peer_mean=r, backend=backend)
    assert not torch.isfinite(out.loss) and torch.equal(w, w0) and torch.equal(r, r0)


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [(dict(peer_norm=-0.1), "peer_norm must be"),
                                    (dict(peer_norm=float("inf")), "peer_norm must be"),
                                    (dict(peer_momentum=1.0), "peer_momentum must be"),
                                    (dict(peer_momentum=-0.5), "peer_momentum must be")])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FFConfig(**kw)
    with pytest.raises(ValueError, match=msg):
        FFLinear(4, 3, **kw)
    with pytest.raises(ValueError, match=msg):
        FFLinear(4, 3).configure(**kw)


def _op_options(**over):
    base = FFConfig(peer_norm=0.2).op_options
    return ";".join(f"{k}={over[k]}" if k in over else item for item in base.split(";")
                    for k in [item.split("=")[0]])


BAD_OP_ARGS = [
    (dict(options=_op_options(peer_norm=-1.0)), ValueError, "peer_norm must be a finite number >= 0"),
    (dict(options=_op_options(peer_norm="nan")), ValueError, "peer_norm must be"),
    (dict(options=_op_options(peer_momentum=1.0)), ValueError, "peer_momentum must be a finite number >= 0"),
    (dict(options=_op_options(peer_momentum="x")), ValueError, "peer_momentum must be a number"),
    (dict(peer_mean=None), ValueError, "peer_norm > 0 needs peer_mean"),
    (dict(peer_mean=torch.zeros(4)), ValueError, r"peer_mean must have shape \(5\)"),
    (dict(peer_mean=torch.zeros(5, 1)), ValueError, r"peer_mean must have shape \(5\)"),
    (dict(peer_mean=torch.zeros(5, dtype=torch.float64)), TypeError, "peer_mean must be Float"),
    (dict(peer_mean=torch.zeros(10)[::2]), RuntimeError, "peer_mean must be contiguous"),
]


@needs_cpu
class TestOpArguments:
    def args(self, **over):
        g = torch.Generator().manual_seed(0)
        a = dict(x_pos=torch.randn(3, 8, generator=g), x_neg=torch.randn(3, 8, generator=g),
                 weight=torch.randn(5, 8, generator=g), bias=torch.randn(5, generator=g), s1w=torch.zeros(5, 8),
                 s2w=torch.zeros(5, 8), s1b=torch.zeros(5), s2b=torch.zeros(5), peer_mean=torch.rand(5, generator=g),
                 step=1, options=_op_options())
        a.update(over)
        return a

    # ff_grad only reads peer_mean: a strided one is accepted there (test_grad_accepts_a_strided_peer_mean)
    @pytest.mark.parametrize("op,over,exc,msg", [(op, *bad) for op in ("ff_step", "ff_grad", "ff_step_labeled",
                                                                          "ff_grad_labeled") for bad in BAD_OP_ARGS
                                                 if not (op.startswith("ff_grad") and "contiguous" in bad[2])])
    def test_rejected_and_nothing_changes(self, op, over, exc, msg):
        a = self.args(**over)
        w0, r0 = a["weight"].clone(), a["peer_mean"].clone() if a["peer_mean"] is not None else None
        labels = (torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), 3, 1.0)
        step_tail = [a["s1w"], a["s2w"], a["s1b"], a["s2b"], a["peer_mean"], a["step"], a["options"]]
        call = {
            "ff_step": lambda: torch.ops.ffkernels.ff_step(a["x_pos"], a["x_neg"], a["weight"], a["bias"],
                                                           *step_tail),
            "ff_grad": lambda: torch.ops.ffkernels.ff_grad(a["x_pos"], a["x_neg"], a["weight"], a["bias"],
                                                           a["peer_mean"], a["options"]),
            "ff_step_labeled": lambda: torch.ops.ffkernels.ff_step_labeled(a["x_pos"], *labels, a["weight"],
                                                                           a["bias"], *step_tail),
            "ff_grad_labeled": lambda: torch.ops.ffkernels.ff_grad_labeled(a["x_pos"], *labels, a["weight"],
                                                                           a["bias"], a["peer_mean"], a["options"]),
        }[op]
        with pytest.raises(exc, match=msg):
            call()
        assert torch.equal(a["weight"], w0)
        if r0 is not None:
            assert torch.equal(a["peer_mean"], r0)

    def test_grad_accepts_a_strided_peer_mean(self):
        a = self.args()
        strided = torch.zeros(10)[::2]
        strided.copy_(a["peer_mean"])
        x = torch.ops.ffkernels.ff_grad(a["x_pos"], a["x_neg"], a["weight"], a["bias"], strided, a["options"])
        y = torch.ops.ffkernels.ff_grad(a["x_pos"], a["x_neg"], a["weight"], a["bias"], a["peer_mean"], a["options"])
        assert all(torch.equal(u, v) for u, v in zip(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_and_functional_check_peer_mean(backend):
    xp, xn, w, b, r = tiny(dtype=torch.float32)
    cfg = FFConfig(peer_norm=0.2)
    with pytest.raises(ValueError, match="needs peer_mean"):
        ffkernels.ff_grad(xp, xn, w, b, cfg, backend=backend)
    with pytest.raises(ValueError, match="needs peer_mean"):
        ffkernels.ff_step(xp, xn, w, b, (torch.zeros_like(w),) * 2, (torch.zeros_like(b),) * 2, 1, cfg,
                          backend=backend)
    with pytest.raises(TypeError, match="peer_mean must be float32"):
        ffkernels.ff_grad(xp, xn, w, b, cfg, peer_mean=r.double(), backend=backend)
    with pytest.raises(ValueError, match="peer_mean must have shape"):
        get_backend(backend).step(xp, xn, w.clone(), b.clone(), (torch.zeros_like(w),) * 2,
                                  (torch.zeros_like(b),) * 2, 1, cfg, peer_mean=r[:3].clone())


# ---- opcheck ----------------------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("optimizer", ("adam", "sgd"))
@pytest.mark.parametrize("bias", (True, False))
def test_opcheck_with_peer_norm(optimizer, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12, generator=g)
    b = torch.randn(6, generator=g) if bias else None
    st = lambda t: torch.zeros(t.shape) if t is not None else None  # noqa: E731
    states = [st(w), st(w), st(b), st(b)] if optimizer == "adam" else [st(w), None, st(b), None]
    opts = FFConfig(peer_norm=0.4, peer_momentum=0.6, optimizer=optimizer, lr=1e-2,
                    momentum=0.9 if optimizer == "sgd" else 0.0).op_options
    xp, xn = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    r = torch.rand(6, generator=g)
    yp, yn = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 0])
    ops = torch.ops.ffkernels
    torch.library.opcheck(ops.ff_grad.default, [xp, xn, w, b, r, opts])
    torch.library.opcheck(ops.ff_step.default, [xp, xn, w, b, *states, r, 1, opts])
    torch.library.opcheck(ops.ff_grad_labeled.default, [xp, yp, yn, 5, 1.0, w, b, r, opts])
    torch.library.opcheck(ops.ff_step_labeled.default, [xp, yp, yn, 5, 1.0, w, b, *states, r, 1, opts])


# ---- the split grad/update path is refused ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ff_update_refuses_peer_norm(backend):
    layer = FFLinear(8, 5, backend=backend, peer_norm=0.1)
    x = torch.randn(3, 8)
    g = layer.ff_grad(x, -x)
    before = _snapshot(layer)
    with pytest.raises(NotImplementedError, match="does not support peer normalization"):
        layer.ff_update(g.grad_weight, g.grad_bias, loss=g.loss)
    after = _snapshot(layer)
    assert all(torch.equal(v, after[k]) for k, v in before.items()) and layer.step_count == 0
