"""Bad input to the module API gets a Python exception that names the problem, on every backend; a failed call
changes nothing. (The registered ops' own checks: test_bad_op_arguments.py.)"""
import copy

import pytest
import torch

from backends import backend_params
from ffkernels import FFLinear, FFNet


@pytest.fixture
def layer(backend):
    torch.manual_seed(0)
    return FFLinear(8, 5, backend=backend.name, device=backend.device)


def _tensors(layer):
    return {k: v for k, v in copy.deepcopy(layer.state_dict()).items() if k != "_extra_state"}


def _assert_unchanged(layer, before):
    after = layer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype).to(device)


@pytest.mark.parametrize("xp,xn,exc,msg", [
    (lambda d: x(4, 7, device=d), lambda d: x(4, 7, device=d), ValueError, "in_features=8"),
    (lambda d: x(4, 8, device=d), lambda d: x(3, 8, device=d), ValueError, "same batch"),
    (lambda d: x(0, 8, device=d), lambda d: x(0, 8, device=d), ValueError, "empty"),
    (lambda d: x(4, 8, dtype=torch.float64, device=d), lambda d: x(4, 8, dtype=torch.float64, device=d), TypeError,
     "dtype"),
    (lambda d: x(4, 8, device=d), lambda d: x(4, 8, dtype=torch.float64, device=d), TypeError, "dtype"),
    (lambda d: [[1.0] * 8], lambda d: x(1, 8, device=d), TypeError, "torch.Tensor"),
    (lambda d: torch.tensor(1.0, device=d), lambda d: x(1, 8, device=d), ValueError, "scalar"),
    (lambda d: torch.randn(4, 8, device="meta"), lambda d: torch.randn(4, 8, device="meta"), ValueError, "meta"),
], ids=["in-features", "batch-mismatch", "empty", "float64", "mixed-dtypes", "not-a-tensor", "scalar", "meta"])
def test_bad_inputs_raise_clear_errors(layer, backend, xp, xn, exc, msg):
    before = _tensors(layer)
    with pytest.raises(exc, match=msg):
        layer.ff_step(xp(backend.device), xn(backend.device))
    _assert_unchanged(layer, before)
    assert layer.step_count == 0


def test_ff_update_checks_its_arguments(layer, backend):
    before = _tensors(layer)
    with pytest.raises(ValueError, match="grad_weight"):
        layer.ff_update(x(3, 3, device=backend.device), x(5, device=backend.device))
    with pytest.raises(ValueError, match="grad_bias"):
        layer.ff_update(x(5, 8, device=backend.device), None)
    assert layer.step_count == 0
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(labels_pos=torch.tensor([0, 1, 10])), ValueError, r"must lie in \[0, 10\)"),
    (dict(labels_neg=torch.tensor([0, 1])), ValueError, "must have shape"),
    (dict(labels_pos=torch.tensor([0.0, 1.0, 2.7])), TypeError, "integer"),
    (dict(labels_neg=torch.tensor([3.0, 4.0, 5.0])), TypeError, "integer"),
    (dict(labels_pos=torch.tensor([False, True, True])), TypeError, "integer"),
    (dict(num_classes=41), ValueError, "num_classes"),
], ids=["label-out-of-range", "labels-shape", "float-labels", "float-neg-labels", "bool-labels", "too-many-classes"])
@pytest.mark.parametrize("backend", backend_params())
def test_bad_labels(backend, kw, exc, msg):
    """Every backend, fused labeled step or pair built by embed_label (the reference): float labels are refused
    (2.7 is no class), not truncated."""
    layer = FFLinear(40, 8, backend=backend.name, device=backend.device)
    a = dict(x=torch.rand(3, 40), labels_pos=torch.tensor([0, 1, 2]), labels_neg=torch.tensor([3, 4, 5]),
             num_classes=10)
    a.update(kw)
    a = {k: v.to(backend.device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    before = _tensors(layer)
    with pytest.raises(exc, match=msg):
        layer.ff_step_labeled(**a)
    _assert_unchanged(layer, before)
    assert layer.step_count == 0


@pytest.mark.parametrize("kw,msg", [
    (dict(norm="batch"), "unknown norm"), (dict(goodness="max"), "unknown goodness"),
    (dict(loss="mse"), "unknown loss"), (dict(optimizer="adamw"), "unknown optimizer"),
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "beta2"), (dict(betas=0.9), "betas"),
    (dict(eps=float("nan")), "eps"), (dict(momentum=-0.1), "momentum"), (dict(threshold=float("inf")), "threshold"),
    (dict(symba_alpha=0.0), "symba_alpha"), (dict(backend="tpu"), "unknown backend"),
    (dict(loss="scff", threshold_neg=float("nan")), "threshold_neg must be finite, got nan"),
    (dict(loss="scff", scff_lambda=-0.1), r"scff_lambda must be a finite number >= 0, got -0.1"),
    (dict(scff_lambda=float("inf")), "scff_lambda"),
])
def test_unknown_or_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FFLinear(8, 5, **kw)


def test_bad_sizes():
    with pytest.raises(ValueError, match="in_features"):
        FFLinear(0, 5)
    with pytest.raises(ValueError, match="out_features"):
        FFLinear(3, 2.5)
    with pytest.raises(ValueError, match="dims"):
        FFNet([784])
