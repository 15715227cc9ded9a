"""The registered ops (public through torch.ops) check their own arguments: a bad call raises an exception that names
the problem and changes nothing. Every compiled namespace, on the shared samples (samples.py)."""
from typing import NamedTuple

import pytest
import torch

from backends import with_ops
from samples import ARGS, sample_inputs


def options_with(sample, **changes):
    """The sample's options string with keys changed (None: removed, so the key is missing)."""
    pairs = dict(p.split("=", 1) for p in sample.cfg.op_options.split(";"))
    for key, value in changes.items():
        if value is None:
            pairs.pop(key)
        else:
            pairs[key] = value
    return ";".join(f"{k}={v}" for k, v in pairs.items())


def options(**changes):
    return {"options": lambda s: options_with(s, **changes)}


def as_float64(*names):
    return {n: (lambda n: lambda s: s[n].double() if s[n] is not None else None)(n) for n in names}


class Case(NamedTuple):
    id: str
    op: str
    changes: dict  # argument name -> (sample -> the bad value)
    expect: object  # (exception, message regex), or {namespace: (exception, regex)}: other namespaces lack the check


INTERPRETER = "ffkernels_triton (interpreter)"
GPU = "on a GPU"  # a key of Case.expect: what any namespace does with CUDA tensors (None: no such check there)
CASES = [
    Case("unknown-norm", "ff_step", options(norm="foo"), (ValueError, "unknown norm 'foo'")),
    Case("unknown-optimizer", "ff_step", options(optimizer="lion"), (ValueError, "unknown optimizer 'lion'")),
    Case("negative-lr", "ff_update", options(lr="-1"), (ValueError, r"lr must be a finite number >= 0, got -1")),
    Case("nan-lr", "ff_step", options(lr="nan"), (ValueError, "lr must be a finite number")),
    Case("zero-symba-alpha", "ff_grad", options(symba_alpha="0"),
         (ValueError, r"symba_alpha must be a finite number > 0, got 0")),
    Case("negative-scff-lambda", "ff_grad", options(scff_lambda="-0.5"),
         (ValueError, r"scff_lambda must be a finite number >= 0, got -0.5")),
    Case("inf-threshold-neg", "ff_step", options(threshold_neg="inf"), (ValueError, "threshold_neg must be finite")),
    Case("missing-key", "ff_step", options(threshold_neg=None), (ValueError, "threshold_neg")),
    Case("beta2-1", "ff_step", options(beta2="1.0"),
         (ValueError, r"beta2 must be a finite number >= 0 and < 1, got 1")),
    Case("unknown-goodness", "ff_grad", options(goodness="max"), (ValueError, "unknown goodness 'max'")),
    Case("unknown-key", "ff_step", options(bogus="1"), (ValueError, "bogus")),
    # a conv options string (conv_op_options: goodness_over, goodness_power, temperature): the linear ops do not
    # compute its math, so every backend refuses it rather than ignoring the extra keys
    Case("conv-options", "ff_grad", {"options": lambda s: s.cfg.conv_op_options}, (ValueError, "goodness_over")),
    Case("conv-options", "ff_step", {"options": lambda s: s.cfg.conv_op_options}, (ValueError, "goodness_over")),
    Case("missing-key", "ff_update", options(lr=None), (ValueError, "lr")),
    Case("missing-key", "ff_grad", options(norm_eps=None), (ValueError, "norm_eps")),
    Case("step-0", "ff_step", {"step": lambda s: 0}, (ValueError, "step must be >= 1")),
    Case("step-0", "ff_update", {"step": lambda s: 0}, (ValueError, "step must be >= 1")),
    Case("batch-mismatch", "ff_step", {"x_neg": lambda s: s["x_neg"][:4]}, (ValueError, "same batch size")),
    Case("batch-mismatch", "ff_grad", {"x_neg": lambda s: s["x_neg"][:3]}, (ValueError, "same batch size")),
    Case("in-features", "ff_grad", {"x_pos": lambda s: s["x_pos"][:, :5], "x_neg": lambda s: s["x_neg"][:, :5]},
         (ValueError, "in_features")),
    Case("float64-input", "ff_step", as_float64("x_pos"), (TypeError, "dtype")),
    Case("int32-input", "ff_step", {"x_pos": lambda s: s["x_pos"].to(torch.int32)}, (TypeError, "dtype")),
    Case("state-shape", "ff_step", {"state2_weight": lambda s: s["state2_weight"][:, :-1].contiguous()},
         (ValueError, r"exp_avg_sq \(weight\) must have the parameter's shape")),
    Case("state-dtype", "ff_step", as_float64("state1_weight"),
         (TypeError, r"optimizer state exp_avg \(weight\) must be")),
    Case("state-dtype", "ff_step", as_float64("state1_bias"), (TypeError, r"optimizer state exp_avg \(bias\) must be")),
    Case("missing-state", "ff_step", {"state2_weight": lambda s: None}, (ValueError, "adam needs .*exp_avg_sq")),
    Case("non-contiguous-weight", "ff_step", {"weight": lambda s: s["weight"].t().contiguous().t()},
         {"ffkernels": (RuntimeError, "weight must be contiguous"),
          "ffkernels_triton": (ValueError, "weight must be contiguous")}),
    Case("bias-shape", "ff_step", {"bias": lambda s: s["bias"][:-1]}, (ValueError, r"bias must .*\(19,?\)")),
    Case("grad-bias-shape", "ff_update", {"grad_bias": lambda s: s["grad_bias"][:-1]},
         (ValueError, "grad_bias must have shape")),
    Case("grad-weight-shape", "ff_update", {"grad_weight": lambda s: s["grad_weight"][:-1]},
         (ValueError, "grad_weight must have shape")),
    Case("loss-shape", "ff_update", {"loss": lambda s: torch.zeros(2, device=s["weight"].device)},
         (ValueError, "loss must")),
    Case("float64-under-the-interpreter", "ff_grad", as_float64("x_pos", "x_neg", "weight", "bias"),
         {INTERPRETER: (TypeError, "supports float32 under the Triton interpreter, got float64")}),
    Case("float64-under-the-interpreter", "ff_update", as_float64("weight", "grad_weight"),
         {INTERPRETER: (TypeError, "supports float32 under the Triton interpreter, got float64")}),
    # on a GPU the range is not read on the host (no sync per step): the loss turns NaN instead (test_gpu_labels.py)
    Case("label-out-of-range", "ff_step_labeled", {"label_pos": lambda s: s["label_pos"] + 5},
         {GPU: None, "ffkernels": (ValueError, r"label_pos must lie in \[0, 5\)"),
          "ffkernels_triton": (ValueError, r"label_pos must lie in \[0, 5\)")}),
    Case("float-labels", "ff_grad_labeled", {"label_neg": lambda s: s["label_neg"].float()},
         (TypeError, "label_neg must be an integer tensor")),
    Case("too-many-classes", "ff_step_labeled", {"num_classes": lambda s: 1000},
         (ValueError, "num_classes must be in")),
]
# peer normalization (sample 0 has it: N = 19, float32 weights): its options and peer_mean, at every op that takes it
PEER_OPS = ("ff_grad", "ff_step", "ff_grad_labeled", "ff_step_labeled")
PEER_CASES = [
    ("negative-peer-norm", options(peer_norm="-1.0"), (ValueError, r"peer_norm must be a finite number >= 0, got -1")),
    ("nan-peer-norm", options(peer_norm="nan"), (ValueError, r"peer_norm must be a finite number >= 0, got nan")),
    ("peer-momentum-1", options(peer_momentum="1.0"),
     (ValueError, r"peer_momentum must be a finite number >= 0 and < 1, got 1")),
    ("peer-momentum-not-a-number", options(peer_momentum="x"), (ValueError, "peer_momentum must be a number")),
    ("no-peer-mean", {"peer_mean": lambda s: None}, (ValueError, "peer_norm > 0 needs peer_mean")),
    ("peer-mean-shape", {"peer_mean": lambda s: s["peer_mean"][:-1]},
     (ValueError, r"peer_mean must have shape \(19,?\)")),
    ("peer-mean-2d", {"peer_mean": lambda s: s["peer_mean"][:, None]},
     (ValueError, r"peer_mean must have shape \(19,?\)")),
    ("peer-mean-float64", as_float64("peer_mean"),
     {"ffkernels": (TypeError, "peer_mean must be Float for Float weights"),
      "ffkernels_triton": (TypeError, "peer_mean must be float32 for float32 weights")}),
]
CASES += [Case(cid, op, changes, expect) for op in PEER_OPS for cid, changes, expect in PEER_CASES]
# the steps update peer_mean in place (ff_grad and ff_grad_labeled read a strided one: test_ops_vs_oracle.py)
CASES += [Case("strided-peer-mean", op, {"peer_mean": lambda s: torch.stack([s["peer_mean"]] * 2, 1)[:, 0]},
               {"ffkernels": (RuntimeError, "peer_mean must be contiguous"),
                "ffkernels_triton": (ValueError, "peer_mean must be contiguous")})
          for op in ("ff_step", "ff_step_labeled")]


def _expected(case, backend):
    if not isinstance(case.expect, dict):
        return case.expect
    if backend.device == "cuda" and GPU in case.expect:
        return case.expect[GPU]
    key = INTERPRETER if backend.name == "triton" and backend.interpreted else backend.namespace
    return case.expect.get(key) or case.expect.get(backend.namespace)


def _params():
    return [pytest.param(b, case, id=f"{b.name}-{case.op}-{case.id}", marks=b.marks)
            for b in with_ops() for case in CASES if case.op in b.op_names and _expected(case, b) is not None]


@pytest.mark.parametrize("backend,case", _params())
def test_op_rejects_bad_arguments(backend, case):
    exc, msg = _expected(case, backend)
    s = sample_inputs(case.op, backend.device)[0]  # Adam, with a bias, non-zero state
    args = s.args(case.op)
    before = {k: v.clone() for k, v in s.values.items() if isinstance(v, torch.Tensor)}
    for name, change in case.changes.items():
        args[ARGS[case.op].index(name)] = change(s)
    with pytest.raises(exc, match=msg):
        backend.op(case.op)(*args)
    for k, v in before.items():  # nothing changed
        assert torch.equal(s[k], v), k
