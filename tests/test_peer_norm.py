"""Peer normalization (docs/design.md, "The math", "Peer normalization"), on every backend the tests can run
(backends.py): the oracle against the hand-derived formula and central differences; every backend against the oracle
with peer normalization on (r compared after every step; the labeled first layer); lambda = 0 bit for bit; the
peer_mean buffer of FFLinear; the refused split grad/update path; bad options and arguments of the functional API.

lambda = peer_norm, mu = peer_momentum, B rows, N units, everything with the weights before the update:
  m_j = mean_i h+_ij,  r'_j = mu r_j + (1 - mu) m_j,  L_peer = lambda mean_j (mean(r') - r'_j)^2,
  dL/dz+_ij += v_j = lambda (2/N) (r'_j - mean(r')) (1 - mu) / B   for every unit, also where z <= 0.

Peer normalization in the behaviour files: the op-level tests run it through the shared samples (samples.py: its
first two configurations have it), so test_ops_vs_oracle.py (r against the oracle's r'), test_split_step.py (the
fused step = ff_grad + ff_update, r left to the step), test_opcheck.py (and peer_mean mutated by the steps only),
test_torch_compile.py and test_bad_op_arguments.py (every peer_mean and option check) cover it; test_non_finite.py
(a NaN input, or an infinite r: r unchanged with the rest), test_resume.py (r in the state_dict) and
test_cpu_threads.py sweep it too; test_triton_ptxas.py compiles the kernels' peer variants.
"""
import itertools

import pytest
import torch

import ffkernels
import oracle
from backends import ALL, KERNELS, backend_dtype_params, case_params
from ffkernels import FFConfig, FFGradOutput, FFLinear, FFNet, embed_label, wrong_labels
from ffkernels.backends import get_backend
from options import peer_options
from tolerance import CENTRAL_DIFFERENCES, FORMULA, check, check_outputs, rule_for
from trajectories import run_and_compare

LAM, MU = 0.5, 0.7
FUSED_LABELED = [b for b in ALL if "ff_step_labeled" in b.op_names]  # a labeled kernel (cpu, cuda, triton)


def _sdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def by_hand(x_pos, weight, bias, r, cfg):
    """r', L_peer, v and the normalized rows from the formulas (RMS norm written out; not the oracle's code)."""
    assert cfg.norm == "rms"
    xh = x_pos / (x_pos.pow(2).sum(1, keepdim=True).div(x_pos.shape[1]).sqrt() + cfg.norm_eps)
    h = torch.relu(xh @ weight.T + (bias if bias is not None else 0))
    B, N = h.shape
    r_new = cfg.peer_momentum * r + (1 - cfg.peer_momentum) * h.sum(0) / B
    r_bar = r_new.sum() / N
    l_peer = cfg.peer_norm * ((r_bar - r_new) ** 2).sum() / N
    v = cfg.peer_norm * (2 / N) * (r_new - r_bar) * (1 - cfg.peer_momentum) / B
    return r_new, l_peer, v, xh


def tiny(seed=0, B=5, K=4, N=6, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xp, xn = torch.randn(B, K, generator=g, dtype=dtype), torch.randn(B, K, generator=g, dtype=dtype)
    w, b = torch.randn(N, K, generator=g, dtype=dtype), torch.randn(N, generator=g, dtype=dtype)
    r = torch.rand(N, generator=g, dtype=_sdt(dtype))
    return tuple(t.to(device) for t in (xp, xn, w, b, r))


def _differs(a, b, rel=1e-3):
    """max|a - b| is more than ``rel`` of max|b|: the peer term is far above any tolerance."""
    return (a.double() - b.double()).abs().max() > rel * b.double().abs().max()


# ---- the oracle against the formula ----------------------------------------------------------------------

@pytest.mark.parametrize("loss,goodness", [("hinton", "sum"), ("symba", "mean")])
def test_oracle_matches_the_formula(loss, goodness):
    xp, xn, w, b, r = tiny()
    cfg = FFConfig(peer_norm=LAM, peer_momentum=MU, loss=loss, goodness=goodness, threshold=2.0)
    b[0] = -100.0  # unit 0 is off for every row: only the straight-through peer term reaches it
    plain = oracle.ff_grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    out, r_new = oracle.ff_grad_peer(xp, xn, w, b, cfg, r)
    want_r, l_peer, v, xh = by_hand(xp, w, b, r, cfg)
    assert torch.all(out.h_pos[:, 0] == 0) and v[0] != 0
    check("r'", r_new, r_new, want_r, FORMULA)
    check("loss", out.loss, out.loss, plain.loss + l_peer, FORMULA)
    check("grad_weight", out.grad_weight, out.grad_weight, plain.grad_weight + torch.outer(v, xh.sum(0)), FORMULA)
    check("grad_bias", out.grad_bias, out.grad_bias, plain.grad_bias + xp.shape[0] * v, FORMULA)
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
    out = oracle.ff_grad(xp, xn, w, b, cfg, r)
    assert (oracle.normalize(xp, "rms", 1e-8) @ w.T + b).min() > 0

    def loss(w_, b_):
        return float(oracle.ff_objective(xp, xn, w_, b_, cfg, r).loss)

    fd_w, fd_b = oracle.central_difference(lambda w_: loss(w_, b), w), oracle.central_difference(lambda b_: loss(w, b_), b)
    check("grad_weight", out.grad_weight, fd_w, fd_w, CENTRAL_DIFFERENCES)
    check("grad_bias", out.grad_bias, fd_b, fd_b, CENTRAL_DIFFERENCES)
    # and the peer part is not negligible in this case
    plain = oracle.ff_grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    assert _differs(plain.grad_weight, fd_w)


def test_oracle_requires_r_and_ignores_it_when_off():
    xp, xn, w, b, r = tiny()
    with pytest.raises(ValueError, match="needs peer_mean"):
        oracle.ff_grad(xp, xn, w, b, FFConfig(peer_norm=0.1))
    off = FFConfig()
    a, e = oracle.ff_grad(xp, xn, w, b, off, r), oracle.ff_grad(xp, xn, w, b, off)
    assert all(torch.equal(x, y) for x, y in zip(a, e))


# ---- every backend against the oracle ----------------------------------------------------------------------

SIZES_B, SIZES_N = (1, 7, 64), (1, 17, 128)
# the reduced sweep (Triton): every size as B, K and N, single- and multi-tile (the interpreter's
# tiles are 128 wide), each with one case of peer_options
REDUCED_SHAPES = [(1, 1, 1), (7, 17, 17), (64, 128, 128), (7, 128, 17), (64, 17, 1), (1, 17, 128), (7, 1, 128),
                  (64, 128, 17)]
OPTIONS_PER_SHAPE = 8  # the full sweep: every loss kind x goodness x optimizer kind on every (B, N)
# B > 128 rows: several M-tiles of column sums that Triton's loss kernel adds in order; N > 1024 units: it walks the
# units in several blocks for r-bar and L_peer
TILING = [("3-M-tiles", (300, 9, 20), dict(goodness="mean", norm="rms", loss="hinton", optimizer="adam", lr=1e-2,
                                            betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, peer_norm=1.0,
                                            peer_momentum=0.5)),
          ("2-unit-blocks", (3, 5, 1100), dict(goodness="mean", norm="l2", loss="symba", optimizer="sgd", lr=0.05,
                                                peer_norm=1.0, peer_momentum=0.5))]


def _step_cases(backend, dtype):
    out = []
    if backend.sweep == "full":
        for s, (B, N) in enumerate(itertools.product(SIZES_B, SIZES_N)):
            for j in range(OPTIONS_PER_SHAPE):
                i = s * OPTIONS_PER_SHAPE + j
                K = (33, 1, 128)[(B + N + j) % 3]
                cid, cfg, bias = peer_options(i)
                out.append((f"{B}x{K}x{N}-{cid}", (B, K, N), cfg, bias))
    else:
        for i, shape in enumerate(REDUCED_SHAPES):
            cid, cfg, bias = peer_options(i)
            out.append((f"{'x'.join(map(str, shape))}-{cid}", shape, cfg, bias))
    return out + [(cid, shape, cfg, True) for cid, shape, cfg in TILING]


@pytest.mark.parametrize("backend,dtype,shape,cfg,bias", case_params(_step_cases, KERNELS))
def test_steps_match_oracle(backend, dtype, shape, cfg, bias):
    """Three FFLinear steps from a random r with unit 0 off: loss, h, g, weight, bias, state and r after each."""
    run_and_compare(backend, *shape, dtype=dtype, bias=bias, dead_unit=True, **cfg)


def _labeled_cases(backend, dtype):
    if backend not in FUSED_LABELED:  # FFLinear builds the pair: once
        return [("7x40x24", (7, 40, 24), peer_options(3)[1], True)]
    return [(f"{B}x40x{N}", (B, 40, N), peer_options(i)[1], i % 2 == 0)
            for i, (B, N) in enumerate(itertools.product(SIZES_B, SIZES_N))]


@pytest.mark.parametrize("backend,dtype,shape,cfg,bias", case_params(_labeled_cases))
def test_labeled_steps_match_oracle_on_the_pair(backend, dtype, shape, cfg, bias):
    """FFLinear.ff_step_labeled with peer normalization against the oracle on the explicit pair (the label columns
    get v too)."""
    run_and_compare(backend, *shape, dtype=dtype, bias=bias, dead_unit=True, labeled_classes=10, **cfg)


def _grad_cases(backend, dtype):
    return [("plain", False)] + ([("labeled", True)] if backend in FUSED_LABELED else [])


@pytest.mark.parametrize("backend,dtype,labeled", case_params(_grad_cases, KERNELS))
def test_grad_matches_oracle_with_a_dead_unit_and_reads_r_only(backend, dtype, labeled):
    """The gradient itself (Adam's first step would hide its scale): straight-through where z <= 0 included; r is
    read, not written; the peer term is far above the tolerance in the loss and both gradients."""
    B, K, N = 9, 30, 13
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, K, generator=g, dtype=torch.float64)
    w, b = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5, torch.randn(N, generator=g,
                                                                                        dtype=torch.float64)
    b[2] = -50.0
    r64 = torch.rand(N, generator=g, dtype=torch.float64)
    cfg = FFConfig(peer_norm=2.0, peer_momentum=0.3, threshold=float(N))
    yp = torch.randint(0, 10, (B,), generator=g)
    yn = wrong_labels(yp, 10, g)
    xp, xn = (embed_label(x, yp, 10), embed_label(x, yn, 10)) if labeled else (x, torch.randn(B, K, generator=g,
                                                                                           dtype=torch.float64))
    dev = backend.device
    r = r64.to(dev, _sdt(dtype))
    r_before = r.clone()
    if labeled:
        out = FFGradOutput(*backend.op("ff_grad_labeled")(x.to(dev, dtype), yp.to(dev), yn.to(dev), 10, 1.0,
                                                          w.to(dev, dtype), b.to(dev, dtype), r, cfg.op_options))
    else:
        out = ffkernels.ff_grad(xp.to(dev, dtype), xn.to(dev, dtype), w.to(dev, dtype), b.to(dev, dtype), cfg,
                                peer_mean=r, backend=backend.name)
    assert torch.equal(r, r_before), "ff_grad wrote peer_mean"
    same = oracle.ff_grad(xp.to(dtype), xn.to(dtype), w.to(dtype), b.to(dtype), cfg, r64.to(_sdt(dtype)))
    exact = oracle.ff_grad(xp, xn, w, b, cfg, r64)
    assert torch.all(exact.h_pos[:, 2] == 0) and torch.all(exact.grad_weight[2, 10:] != 0)
    check_outputs("", out, same, exact, cfg, rule_for(dtype, backend.gpu))
    off = oracle.ff_grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    assert _differs(off.grad_weight, exact.grad_weight) and _differs(off.grad_bias, exact.grad_bias)
    assert abs(off.loss.item() - exact.loss.item()) > 1e-3


# ---- lambda = 0 changes nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("labeled", (False, True), ids=("plain", "labeled"))
def test_lambda_zero_is_bit_identical(backend, labeled):
    """A layer with peer_norm=0 (whatever peer_momentum) is the layer without the option, bit for bit, and its
    state_dict has no peer_mean."""
    dev = backend.device
    outs = []
    for kw in ({}, dict(peer_norm=0.0, peer_momentum=0.5)):
        torch.manual_seed(0)
        layer = FFLinear(40, 16, backend=backend.name, device=dev, **kw)
        g = torch.Generator().manual_seed(1)
        seq = []
        for _ in range(3):
            x = torch.randn(8, 40, generator=g).to(dev)
            if labeled:
                y = torch.randint(0, 10, (8,), generator=g)
                seq.append(layer.ff_step_labeled(x, y.to(dev), wrong_labels(y, 10, g).to(dev), 10))
            else:
                seq.append(layer.ff_step(x, torch.randn(8, 40, generator=g).to(dev)))
        outs.append((seq, layer.state_dict()))
    (seq_a, sd_a), (seq_b, sd_b) = outs
    for a, b in zip(seq_a, seq_b):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert list(sd_a) == list(sd_b) and "peer_mean" not in sd_a
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if k != "_extra_state")


def test_lambda_zero_ignores_peer_mean(backend):
    """peer_norm = 0: none of the peer code runs. Whatever peer_mean is given (a real r, one full of NaN that would
    poison everything if read, None, or one of the wrong shape and dtype) the functional ops and the registered ops
    under them give the same results bit for bit, and never write it."""
    dev = backend.device
    B, K, N = 7, 40, 24
    cfg = FFConfig(goodness="sum", threshold=float(N), norm="rms", loss="symba", optimizer="adam", lr=1e-2,
                   betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    cfgs = [cfg, cfg.replace(peer_momentum=0.25), cfg, cfg]
    _, _, w, b, r = tiny(seed=8, B=B, K=K, N=N, dtype=torch.float32, device=dev)
    given = [r.clone(), torch.full_like(r, float("nan")), None, torch.zeros(3, dtype=torch.float64, device=dev)]
    kept = [None if t is None else t.clone() for t in given]
    runs = [(w.clone(), b.clone(), tuple(torch.zeros_like(w) for _ in range(2)),
             tuple(torch.zeros_like(b) for _ in range(2))) for _ in given]
    gen = torch.Generator().manual_seed(9)
    for step in (1, 2):
        xp, xn = (torch.randn(B, K, generator=gen).to(dev) for _ in range(2))
        outs = [ffkernels.ff_step(xp, xn, *run, step, c, peer_mean=pm, backend=backend.name)
                for run, c, pm in zip(runs, cfgs, given)]
        grads = [ffkernels.ff_grad(xp, xn, run[0], run[1], c, peer_mean=pm, backend=backend.name)
                 for run, c, pm in zip(runs, cfgs, given)]
        for other in range(1, len(given)):
            for f, a, e in zip(outs[0]._fields, outs[other], outs[0]):
                assert torch.equal(a, e), f"step {step} {f}: peer_mean changed a peer_norm=0 step"
            for f, a, e in zip(grads[0]._fields, grads[other], grads[0]):
                assert torch.equal(a, e), f"step {step} grad {f}: peer_mean changed a peer_norm=0 gradient"
            for name, a, e in zip(("weight", "bias"), runs[other][:2], runs[0][:2]):
                assert torch.equal(a, e), f"step {step} {name}"
            for a, e in zip(runs[other][2] + runs[other][3], runs[0][2] + runs[0][3]):
                assert torch.equal(a, e), f"step {step} optimizer state"
    for t, k in zip(given, kept):
        assert t is None or torch.equal(t, k) or (t.isnan().all() and k.isnan().all()), "peer_mean written"


# ---- FFLinear: the buffer, configure, the refused split path -------------------------------------------------

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


def test_layer_r_updates_and_resets(backend):
    """ff_grad only reads r; ff_step commits r' = (1 - mu) mean(h_pos) from r = 0; reset_optimizer_state zeroes r."""
    dev = backend.device
    layer = FFLinear(12, 5, backend=backend.name, device=dev, peer_norm=0.3, peer_momentum=0.6)
    x = torch.randn(6, 12).to(dev)
    g_before = layer.ff_grad(x, -x)
    assert torch.equal(layer.peer_mean, torch.zeros(5, device=dev))
    out = layer.ff_step(x, -x)
    want, rule = 0.4 * out.h_pos.double().mean(0), rule_for(torch.float32, backend.gpu)
    check("peer_mean", layer.peer_mean, want, want, rule)
    check("loss", out.loss, g_before.loss, g_before.loss, rule)
    layer.reset_optimizer_state()
    assert torch.equal(layer.peer_mean, torch.zeros(5, device=dev)) and layer.step_count == 0


def test_nn_linear_state_dict_loads_into_a_peer_layer():
    lin = torch.nn.Linear(6, 4)
    layer = FFLinear(6, 4, peer_norm=0.1)
    layer.ff_step(torch.randn(3, 6), torch.randn(3, 6))
    layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.peer_mean, torch.zeros(4))
    assert layer.step_count == 0


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if k != "_extra_state"}


def test_ff_update_refuses_peer_norm(backend):
    dev = backend.device
    layer = FFLinear(8, 5, backend=backend.name, device=dev, peer_norm=0.1)
    x = torch.randn(3, 8).to(dev)
    g = layer.ff_grad(x, -x)
    before = _snapshot(layer)
    with pytest.raises(NotImplementedError, match="does not support peer normalization"):
        layer.ff_update(g.grad_weight, g.grad_bias, loss=g.loss)
    after = _snapshot(layer)
    assert all(torch.equal(v, after[k]) for k, v in before.items()) and layer.step_count == 0


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(peer_norm=-0.1), r"peer_norm must be a finite number >= 0, got -0\.1"),
    (dict(peer_norm=float("inf")), r"peer_norm must be a finite number >= 0, got inf"),
    (dict(peer_momentum=1.0), r"peer_momentum must be a finite number >= 0 and < 1, got 1\.0"),
    (dict(peer_momentum=-0.5), r"peer_momentum must be a finite number >= 0 and < 1, got -0\.5"),
], ids=["negative-lambda", "infinite-lambda", "mu-1", "negative-mu"])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FFConfig(**kw)
    with pytest.raises(ValueError, match=msg):
        FFLinear(4, 3, **kw)
    with pytest.raises(ValueError, match=msg):
        FFLinear(4, 3).configure(**kw)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_functional_api_and_backends_check_peer_mean(backend, dtype):
    """ffkernels.ff_grad / ff_step and the backends' own step check peer_mean before any work. (The registered
    ops' checks: test_bad_op_arguments.py.)"""
    xp, xn, w, b, r = tiny(dtype=dtype, device=backend.device)
    cfg = FFConfig(peer_norm=0.2)
    states = lambda p: tuple(torch.zeros_like(p, dtype=_sdt(dtype)) for _ in range(2))  # noqa: E731
    other = torch.float32 if dtype == torch.float64 else torch.float64
    want = "float64" if dtype == torch.float64 else "float32"
    with pytest.raises(ValueError, match="needs peer_mean"):
        ffkernels.ff_grad(xp, xn, w, b, cfg, backend=backend.name)
    with pytest.raises(ValueError, match="needs peer_mean"):
        ffkernels.ff_step(xp, xn, w, b, states(w), states(b), 1, cfg, backend=backend.name)
    with pytest.raises(TypeError, match=f"peer_mean must be {want} for {want} weights"):
        ffkernels.ff_grad(xp, xn, w, b, cfg, peer_mean=r.to(other), backend=backend.name)
    w0 = w.clone()
    with pytest.raises(ValueError, match=r"peer_mean must have shape \(6,?\)"):
        get_backend(backend.name).step(xp, xn, w, b, states(w), states(b), 1, cfg, peer_mean=r[:3].clone())
    assert torch.equal(w, w0)
