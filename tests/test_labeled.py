"""The supervised first layer: FFLinear.ff_step_labeled(x, y_pos, y_neg, C) is the step on the explicit pair
embed_label(x, y_pos), embed_label(x, y_neg). Backends with a fused labeled step (cpu, cuda, triton: x normalized once,
B-row GEMMs shared by positive and negative) run the full sweep; the others build the pair and are checked once."""
import itertools

import pytest
import torch

import ffkernels
import oracle
from backends import ALL, DTYPE_IDS, FP64, backend_dtype_params
from ffkernels.backends import get_backend
from samples import sample_ids, sample_inputs
from tolerance import check, check_outputs, rule_for
from trajectories import run_and_compare

FUSED = [b for b in ALL if "ff_step_labeled" in b.op_names]


def _fused(make):
    return [pytest.param(b, dt, *args, id="-".join([b.name, DTYPE_IDS[dt], case_id]), marks=b.marks)
            for b in FUSED for dt in b.dtypes for case_id, *args in make(dt)]


SHAPES = [(1, 10, 1, 10), (7, 17, 17, 10), (64, 128, 33, 4), (64, 784, 128, 10), (7, 2, 5, 2)]  # (B, K, N, C)
OPTIONS = list(itertools.product(("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba"), ("adam", "sgd"),
                                 (True, False)))


@pytest.mark.parametrize("backend,dtype,B,K,N,C", _fused(lambda dt: [("x".join(map(str, s)), *s) for s in SHAPES]))
def test_shapes(backend, dtype, B, K, N, C):
    run_and_compare(backend, B, K, N, labeled_classes=C, dtype=dtype)


@pytest.mark.parametrize("backend,dtype,norm,goodness,loss,optimizer,bias", _fused(
    lambda dt: [] if dt == FP64 else [("-".join(map(str, o[:4])) + ("-bias" if o[4] else "-nobias"), *o)
                                      for o in OPTIONS]))
def test_options(backend, dtype, norm, goodness, loss, optimizer, bias):
    run_and_compare(backend, 7, 40, 24, labeled_classes=10, label_value=0.5, bias=bias, norm=norm, goodness=goodness,
                    loss=loss, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_every_backend(backend, dtype):
    """Fused or by building the pair: the same as the oracle on the explicit pair."""
    run_and_compare(backend, 7, 40, 24, labeled_classes=10, label_value=0.5, dtype=dtype, loss="symba")


@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_ffnet_labeled_equals_explicit_pairs(backend, dtype):
    torch.manual_seed(0)
    kw = dict(backend=backend.name, device=backend.device, dtype=dtype)
    a, b = ffkernels.FFNet([30, 16, 16], **kw), ffkernels.FFNet([30, 16, 16], **kw)
    b.load_state_dict(a.state_dict())
    rule = rule_for(dtype, backend.gpu)
    for step in range(3):
        x = torch.rand(8, 30, dtype=dtype).to(backend.device)
        y = torch.randint(0, 10, (8,)).to(backend.device)
        yn = ffkernels.wrong_labels(y, 10)
        oa = a.ff_step_labeled(x, y, yn, 10)
        ob = b.ff_step(ffkernels.embed_label(x, y, 10), ffkernels.embed_label(x, yn, 10))
        check(f"step {step} losses", oa.losses, ob.losses, ob.losses, rule)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        check(name, pa, pb, pb, rule)


def _labeled_cases():
    return [pytest.param(b, dt, i, id=f"{b.name}-{DTYPE_IDS[dt]}-{sid}", marks=b.marks)
            for b in FUSED for dt in b.dtypes for i, sid in enumerate(sample_ids("ff_grad_labeled"))]


def _pair(s, dtype):
    """The sample as the explicit pair, in ``dtype``."""
    t = s.to(dtype)
    xp, xn = (ffkernels.embed_label(t["x"], t[y], t["num_classes"], t["label_value"]) for y in ("label_pos",
                                                                                                  "label_neg"))
    return t, xp, xn


@pytest.mark.parametrize("backend,dtype,i", _labeled_cases())
def test_grad_labeled_matches_oracle(backend, dtype, i):
    """The registered op (no backend method calls it: FFLinear.ff_grad takes the explicit pair); it reads peer_mean
    and writes nothing."""
    s = sample_inputs("ff_grad_labeled", backend.device, dtype)[i]
    given = s.clone()
    r = backend.op("ff_grad_labeled")(*s.args("ff_grad_labeled"))
    out = ffkernels.FFGradOutput(*r[:6], r[6] if s["bias"] is not None else None)
    refs = [oracle.ff_grad(xp, xn, t["weight"], t["bias"], s.cfg, t["peer_mean"])
            for t, xp, xn in (_pair(s, dtype), _pair(s, torch.float64))]
    check_outputs("", out, *refs, s.cfg, rule_for(dtype, backend.gpu))
    for name, v in given.values.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(s[name], v), name


@pytest.mark.parametrize("backend,dtype,i", _labeled_cases())
def test_step_labeled_matches_oracle(backend, dtype, i):
    s = sample_inputs("ff_step_labeled", backend.device, dtype)[i]
    ours = s.clone()
    out = get_backend(backend.name).step_labeled(ours["x"], ours["label_pos"], ours["label_neg"], s["num_classes"],
                                                 s["label_value"], ours["weight"], ours["bias"], ours.states("weight"),
                                                 ours.states("bias") if s["bias"] is not None else (), s.step, s.cfg,
                                                 peer_mean=ours["peer_mean"])
    rule = rule_for(dtype, backend.gpu)
    refs, expected = [], []
    for t, xp, xn in (_pair(s, dtype), _pair(s, torch.float64)):
        refs.append(oracle.ff_step(xp, xn, t["weight"], t["bias"], t.states("weight"), t.states("bias"), s.step,
                                   s.cfg, t["peer_mean"]))
        expected.append(t)
    check_outputs("", out, *refs, s.cfg, rule)
    for p in ["weight"] + (["bias"] if s["bias"] is not None else []):
        check(p, ours[p], expected[0][p], expected[1][p], rule)
        for j, (a, r, e) in enumerate(zip(ours.states(p), expected[0].states(p), expected[1].states(p))):
            check(f"{s.cfg.state_names[j]} of {p}", a, r, e, rule)
    if s["peer_mean"] is not None:
        assert not torch.equal(ours["peer_mean"], s["peer_mean"]), "r was not committed"
        check("peer_mean", ours["peer_mean"], expected[0]["peer_mean"], expected[1]["peer_mean"], rule)
