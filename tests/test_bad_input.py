"""Bad input gets a Python exception that names the problem; a failed step changes nothing."""
import copy
import os

import pytest
import torch

import ffkernels
from ffkernels import BackendUnavailableError, FFLinear, FFNet, NonFiniteLossError

BACKENDS = [b for b in ("cpu", "reference") if b in ffkernels.available_backends()]


@pytest.fixture(params=BACKENDS)
def layer(request):
    torch.manual_seed(0)
    return FFLinear(8, 5, backend=request.param)


def x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("xp,xn,exc,msg", [
    (lambda: x(4, 7), lambda: x(4, 7), ValueError, "in_features=8"),
    (lambda: x(4, 8), lambda: x(3, 8), ValueError, "same batch"),
    (lambda: x(0, 8), lambda: x(0, 8), ValueError, "empty"),
    (lambda: x(4, 8, dtype=torch.float64), lambda: x(4, 8, dtype=torch.float64), TypeError, "dtype"),
    (lambda: x(4, 8), lambda: x(4, 8, dtype=torch.float64), TypeError, "dtype"),
    (lambda: [[1.0] * 8], lambda: x(1, 8), TypeError, "torch.Tensor"),
    (lambda: torch.tensor(1.0), lambda: x(1, 8), ValueError, "scalar"),
    (lambda: torch.randn(4, 8, device="meta"), lambda: torch.randn(4, 8, device="meta"), ValueError, "meta"),
])
def test_bad_inputs_raise_clear_errors(layer, xp, xn, exc, msg):
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(exc, match=msg):
        layer.ff_step(xp(), xn())
    after = layer.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k != "_extra_state")


@pytest.mark.parametrize("kw,msg", [
    (dict(norm="batch"), "unknown norm"), (dict(goodness="max"), "unknown goodness"),
    (dict(loss="mse"), "unknown loss"), (dict(optimizer="adamw"), "unknown optimizer"),
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "beta2"), (dict(betas=0.9), "betas"),
    (dict(eps=float("nan")), "eps"), (dict(momentum=-0.1), "momentum"), (dict(threshold=float("inf")), "threshold"),
    (dict(symba_alpha=0.0), "symba_alpha"), (dict(backend="tpu"), "unknown backend"),
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


def test_unavailable_backends_say_why():
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            FFLinear(4, 3, backend="cuda").backend
    if "cpu" in BACKENDS:
        with pytest.raises(BackendUnavailableError, match="runs on cpu tensors"):
            ffkernels.resolve_backend("cpu", "meta")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
            ffkernels.resolve_backend("triton", "cpu")


def test_auto_backend_falls_back_for_unsupported_dtype():
    assert FFLinear(4, 3, dtype=torch.bfloat16).backend == "reference"
    assert FFLinear(4, 3).backend == ("cpu" if "cpu" in BACKENDS else "reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_changes_nothing(layer, bad):
    layer.ff_step(x(4, 8), x(4, 8))  # non-trivial optimizer state first
    before = copy.deepcopy(layer.state_dict())
    xp = x(4, 8)
    xp[2, 3] = bad
    with pytest.raises(NonFiniteLossError, match="not finite"):
        layer.ff_step(xp, x(4, 8))
    after = layer.state_dict()
    assert layer.step_count == 1
    for k, v in before.items():
        if k != "_extra_state":
            assert torch.equal(v, after[k]), k


def test_ffnet_names_the_failing_layer():
    xp = torch.full((2, 6), 1e30)  # finite input whose goodness overflows in layer 0 with norm="none"
    net = FFNet([6, 4, 4], norm="none")
    with pytest.raises(NonFiniteLossError, match="layer 0"):
        net.ff_step(xp, xp)


def test_ff_update_checks_its_arguments(layer):
    with pytest.raises(ValueError, match="grad_weight"):
        layer.ff_update(torch.zeros(3, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="grad_bias"):
        layer.ff_update(torch.zeros(5, 8), None)
    with pytest.raises(NonFiniteLossError):
        layer.ff_update(torch.zeros(5, 8), torch.zeros(5), loss=torch.tensor(float("nan")))
    assert layer.step_count == 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="ffkernels._C not built")
class TestRawOps:
    """The registered ops check their own arguments (they are public through torch.ops)."""

    def args(self, **over):
        w, b = torch.randn(5, 8), torch.randn(5)
        a = dict(x_pos=torch.randn(3, 8), x_neg=torch.randn(3, 8), weight=w, bias=b,
                 s1w=torch.zeros(5, 8), s2w=torch.zeros(5, 8), s1b=torch.zeros(5), s2b=torch.zeros(5), peer_mean=None,
                 step=1)
        opts = dict(norm="rms", norm_eps=1e-8, goodness="sum", threshold=5.0, loss="hinton", symba_alpha=4.0,
                    optimizer="adam", lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, momentum=0.0, weight_decay=0.0,
                    peer_norm=0.0, peer_momentum=0.9)
        for k, v in over.items():
            (opts if k in opts else a)[k] = v
        return list(a.values()) + [";".join(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in opts.items())]

    @pytest.mark.parametrize("over,exc,msg", [
        (dict(norm="foo"), ValueError, "unknown norm 'foo'"),
        (dict(optimizer="lion"), ValueError, "unknown optimizer"),
        (dict(step=0), ValueError, "step must be >= 1"),
        (dict(x_neg=torch.randn(4, 8)), ValueError, "same batch size"),
        (dict(x_pos=torch.randn(3, 8, dtype=torch.float64)), TypeError, "dtype mismatch"),
        (dict(s2w=torch.zeros(5, 7)), ValueError, "exp_avg_sq"),
        (dict(s1w=torch.zeros(5, 8, dtype=torch.float64)), TypeError, "optimizer state"),
        (dict(weight=torch.randn(8, 5).t()), RuntimeError, "contiguous"),
        (dict(x_pos=torch.randn(3, 8).to(torch.int32)), TypeError, "dtype"),
        (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
        (dict(lr=float("nan")), ValueError, "lr must be"),
    ])
    def test_ff_step_op_rejects(self, over, exc, msg):
        a = self.args(**over)
        w0 = a[2].clone()
        with pytest.raises(exc, match=msg):
            torch.ops.ffkernels.ff_step(*a)
        if a[2].is_contiguous():
            assert torch.equal(a[2], w0)

    def test_non_contiguous_inputs_are_handled(self):
        a = self.args()
        b = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
        a[0] = b[0].t().contiguous().t()  # same values, non-contiguous
        assert not a[0].is_contiguous()
        ra, rb = torch.ops.ffkernels.ff_step(*a), torch.ops.ffkernels.ff_step(*b)
        torch.testing.assert_close(ra[0], rb[0])
        torch.testing.assert_close(a[2], b[2])
