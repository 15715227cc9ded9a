"""The functional ops (ffkernels.ff_grad / ff_update / ff_step) of every kernel backend (not the reference, whose
ops are the oracle) against the oracle, on the shared
samples (samples.py): given non-zero optimizer state, given gradients, strided inputs, float32 and float64; with peer
normalization where the sample has it (its running mean r: read by ff_grad, committed by ff_step)."""
import pytest
import torch

import ffkernels
import oracle
from backends import KERNELS, backend_dtype_params
from samples import sample_ids, sample_inputs
from tolerance import check, check_outputs, rule_for


def _params(s):
    return ["weight"] + (["bias"] if s["bias"] is not None else [])


def _oracle_update(s, grads):
    """torch.optim's update of the sample's parameters and state (in place) with the given gradients."""
    names = _params(s)
    oracle.optimizer_update([s[p] for p in names], grads, [s.states(p) for p in names], s.step, s.cfg)


def _check_params_and_states(prefix, ours, same, exact, rule):
    """Parameters, optimizer state and, with peer normalization, r."""
    for p in _params(exact):
        check(f"{prefix}{p}", ours[p], same[p], exact[p], rule)
        for j, (a, r, t) in enumerate(zip(ours.states(p), same.states(p), exact.states(p))):
            check(f"{prefix}{ours.cfg.state_names[j]} of {p}", a, r, t, rule)
    if exact["peer_mean"] is not None:
        check(f"{prefix}peer_mean", ours["peer_mean"], same["peer_mean"], exact["peer_mean"], rule)


def _oracle_pair(s, dtype):
    """Copies of the sample for the oracle: in the backend's precision, and in float64."""
    return s.to(dtype), s.to(torch.float64)


@pytest.mark.parametrize("i", range(len(sample_ids("ff_grad"))), ids=sample_ids("ff_grad"))
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(KERNELS))
def test_ff_grad(backend, dtype, i):
    s = sample_inputs("ff_grad", backend.device, dtype)[i]
    given = s.clone()
    out = ffkernels.ff_grad(s["x_pos"], s["x_neg"], s["weight"], s["bias"], s.cfg, peer_mean=s["peer_mean"],
                            backend=backend.name)
    same, exact = _oracle_pair(s, dtype)
    refs = [oracle.ff_grad(t["x_pos"], t["x_neg"], t["weight"], t["bias"], s.cfg, t["peer_mean"])
            for t in (same, exact)]
    check_outputs("", out, *refs, s.cfg, rule_for(dtype, backend.gpu))
    for name, v in given.values.items():  # nothing written, r included
        if isinstance(v, torch.Tensor):
            assert torch.equal(s[name], v), name


@pytest.mark.parametrize("i", range(len(sample_ids("ff_update"))), ids=sample_ids("ff_update"))
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(KERNELS))
def test_ff_update(backend, dtype, i):
    """Update number ``step`` from given gradients and non-zero state, as torch.optim does it."""
    s = sample_inputs("ff_update", backend.device, dtype)[i]
    ours = s.clone()
    ffkernels.ff_update(ours["weight"], ours["bias"], ours["grad_weight"], ours["grad_bias"], ours.states("weight"),
                        ours.states("bias"), s.step, s.cfg, loss=ours["loss"], backend=backend.name)
    same, exact = _oracle_pair(s, dtype)
    for t in (same, exact):
        _oracle_update(t, [t["grad_weight"]] + ([t["grad_bias"]] if t["bias"] is not None else []))
    _check_params_and_states("", ours, same, exact, rule_for(dtype, backend.gpu))


@pytest.mark.parametrize("i", range(len(sample_ids("ff_step"))), ids=sample_ids("ff_step"))
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(KERNELS))
def test_ff_step(backend, dtype, i):
    """The fused step: the oracle's gradient, then torch.optim's update (outputs from the weights before it), and
    r <- r' with peer normalization."""
    s = sample_inputs("ff_step", backend.device, dtype)[i]
    ours = s.clone()
    out = ffkernels.ff_step(ours["x_pos"], ours["x_neg"], ours["weight"], ours["bias"], ours.states("weight"),
                            ours.states("bias"), s.step, s.cfg, peer_mean=ours["peer_mean"], backend=backend.name)
    same, exact = _oracle_pair(s, dtype)
    refs = [oracle.ff_step(t["x_pos"], t["x_neg"], t["weight"], t["bias"], t.states("weight"), t.states("bias"),
                           s.step, s.cfg, t["peer_mean"]) for t in (same, exact)]
    if s["peer_mean"] is not None:
        assert not torch.equal(ours["peer_mean"], s["peer_mean"]), "r was not committed"
    rule = rule_for(dtype, backend.gpu)
    check_outputs("", out, *refs, s.cfg, rule)
    _check_params_and_states("", ours, same, exact, rule)


@pytest.mark.parametrize("op", ["ff_grad", "ff_update", "ff_step"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params(KERNELS))
def test_strided_inputs_give_the_contiguous_results(backend, dtype, op):
    """Non-contiguous inputs (x, the gradients given to ff_update, peer_mean given to ff_grad) are accepted, with
    exactly the results of contiguous copies."""
    strided = sample_inputs(op, backend.device, dtype)[sample_ids(op).index("strided")]
    assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in strided.values.values())
    dense = strided.to(dtype)
    results = []
    for s in (strided.clone(), dense):
        if op == "ff_grad":
            out = ffkernels.ff_grad(s["x_pos"], s["x_neg"], s["weight"], s["bias"], s.cfg, peer_mean=s["peer_mean"],
                                    backend=backend.name)
        elif op == "ff_step":
            out = ffkernels.ff_step(s["x_pos"], s["x_neg"], s["weight"], s["bias"], s.states("weight"),
                                    s.states("bias"), s.step, s.cfg, peer_mean=s["peer_mean"], backend=backend.name)
        else:
            out = ffkernels.ff_update(s["weight"], s["bias"], s["grad_weight"], s["grad_bias"], s.states("weight"),
                                      s.states("bias"), s.step, s.cfg, loss=s["loss"], backend=backend.name)
        results.append((out, s))
    (out_a, a), (out_b, b) = results
    pairs = list(zip(getattr(out_a, "_fields", ()), out_a or (), out_b or ()))
    pairs += [(name, x, b[name]) for name, x in a.values.items() if isinstance(x, torch.Tensor)]
    assert_same_results(backend, dtype, pairs)


def assert_same_results(backend, dtype, pairs):
    """(name, a, b) pairs are equal, bitwise: the kernels copy strided inputs into the layout they compute on."""
    for name, x, y in pairs:
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("backend,dtype", backend_dtype_params(KERNELS))
def test_ff_grad_of_a_non_contiguous_weight(backend, dtype):
    """ff_grad does not update the weight: the Python backends accept a strided one (same results); the compiled
    ops ask for a contiguous weight, saying so."""
    s = sample_inputs("ff_grad", backend.device, dtype)[0]
    w = s["weight"].t().contiguous().t()
    assert not w.is_contiguous()
    r = s["peer_mean"]
    if backend.name in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="weight must be contiguous"):
            ffkernels.ff_grad(s["x_pos"], s["x_neg"], w, s["bias"], s.cfg, peer_mean=r, backend=backend.name)
        return
    got = ffkernels.ff_grad(s["x_pos"], s["x_neg"], w, s["bias"], s.cfg, peer_mean=r, backend=backend.name)
    want = ffkernels.ff_grad(s["x_pos"], s["x_neg"], s["weight"], s["bias"], s.cfg, peer_mean=r,
                             backend=backend.name)
    assert_same_results(backend, dtype, list(zip(got._fields, got, want)))
