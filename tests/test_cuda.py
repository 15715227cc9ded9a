"""The CUDA C++ backend ("cuda"): how it was built, and (on a GPU) its results against the reference.

The build tests run everywhere. The GPU tests (marked ``gpu``) skip without a GPU and compare:
  * fp32 (TF32 off) with ``FFLayerRef`` (autograd + torch.optim) over several steps: 1e-5 relative,
    except where fp32 itself is ill-conditioned (then at most twice the fp32 reference's error vs fp64);
  * float16/bfloat16 FlashAttention-style: the error against an fp64 reference may be at most twice
    the error of the same-precision reference (autograd in that dtype, optimizer state in fp32).
Set FFKERNELS_EXPECT_CUDA=1 (CI with a toolkit, the GPU check script) to make a build without CUDA
kernels fail instead of skip.
"""
from __future__ import annotations

import itertools
import os
import re

import pytest
import torch

import ffkernels
from ffkernels import functional
from ffkernels.backends import compiled as _ext
from ffkernels.backends import reference as ref
from ffkernels._types import BackendUnavailableError, NonFiniteLossError
from ffkernels.backends import BACKENDS, resolve_backend
from ffkernels.config import FFConfig

OPS = ("ff_grad", "ff_update", "ff_step")

# ---- the build ---------------------------------------------------------------------------------------

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"ffkernels._C is not built ({_ext.load_error()})")


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ffkernels::{op}", "CPU")


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_built_with_cuda(op):
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"ffkernels::{op}", "CUDA")
    if not _ext.built_with_cuda():
        assert not has_cuda_kernel, "ffkernels._C says it was built without CUDA but registers CUDA kernels"
        if os.environ.get("FFKERNELS_EXPECT_CUDA") == "1":
            pytest.fail("FFKERNELS_EXPECT_CUDA=1 but ffkernels._C was built without CUDA kernels "
                        "(no toolkit found at build time, or FFKERNELS_CUDA=0)")
        pytest.skip("ffkernels._C was built without CUDA kernels (no CUDA toolkit at build time or FFKERNELS_CUDA=0)")
    assert has_cuda_kernel, f"ffkernels._C was built with CUDA but has no CUDA kernel for ffkernels::{op}"
    assert _ext.cuda_archs(), "a CUDA build records the archs it was compiled for"


def test_unavailable_cuda_backend_says_why():
    reason = BACKENDS["cuda"].unavailable_reason()
    if reason is None:
        pytest.skip("the cuda backend is available here")
    assert "cuda" not in ffkernels.available_backends()
    with pytest.raises(BackendUnavailableError, match=re.escape(f"backend 'cuda' is not available: {reason}")):
        resolve_backend("cuda", "cuda")


# ---- GPU tests ---------------------------------------------------------------------------------------

_cuda_reason = BACKENDS["cuda"].unavailable_reason()
gpu = pytest.mark.gpu
needs_cuda_backend = pytest.mark.skipif(_cuda_reason is not None, reason=f"cuda backend unavailable: {_cuda_reason}")

LOSS_OPTIONS = [dict(norm=n, goodness=g, loss=l)
                for n, g, l in itertools.product(("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba"))]
OPTIM_OPTIONS = [
    dict(optimizer="adam"),
    dict(optimizer="adam", betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, lr=1e-2),
    dict(optimizer="sgd", lr=0.05),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
]
ALL_OPTIONS = [(lo, oo, bias) for lo in LOSS_OPTIONS for oo in OPTIM_OPTIONS for bias in (True, False)]
SIZES_B = (1, 7, 64)
SIZES_KN = (1, 17, 128, 784)
SHAPES = list(itertools.product(SIZES_B, SIZES_KN, SIZES_KN))
STEPS = 3


def _options_id(opts):
    lo, oo, bias = opts
    extra = "".join(f"-{k}{v}" for k, v in oo.items() if k != "optimizer")
    return f"{lo['norm']}-{lo['goodness']}-{lo['loss']}-{oo['optimizer']}{extra}-{'bias' if bias else 'nobias'}"


@pytest.fixture
def ieee_fp32():
    """fp32 GEMMs in full precision for the duration of a test (TF32 would dominate the error)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _layer_pair(K, N, bias, loss_opts, optim_opts):
    """An fp32 FFLinear on the cuda backend and the oracle FFLayerRef, with the same weights and options."""
    torch.manual_seed(0)
    threshold = FFConfig.default_threshold(loss_opts["goodness"], N)
    layer = ffkernels.FFLinear(K, N, bias=bias, threshold=threshold, backend="cuda", device="cuda",
                               **loss_opts, **optim_opts)
    oracle = ref.FFLayerRef(layer.weight, layer.bias, layer.config)
    return layer, oracle


def _inputs(B, K, dtype=torch.float32):
    return torch.randn(B, K, device="cuda", dtype=dtype), torch.randn(B, K, device="cuda", dtype=dtype)


def _max_err(x, oracle):
    return (x.double() - oracle.double()).abs().max().item()


def _assert_within_reference_error(what, ours, same_precision, oracle, dtype, factor=2.0):
    """FlashAttention-style: our error vs the fp64 oracle is at most `factor` times the same-precision
    reference's, plus one rounding of the output dtype (for tensors the reference gets exactly right)."""
    err, ref_err = _max_err(ours, oracle), _max_err(same_precision, oracle)
    slack = torch.finfo(dtype).eps * oracle.double().abs().max().item()
    assert err <= factor * ref_err + slack, (
        f"{what} ({dtype}): max error {err:.3g} vs the same-precision reference's {ref_err:.3g} (slack {slack:.3g})")


def _assert_fp32_close(actual, expected, what, slack=None, oracle=None):
    """Elementwise rtol 1e-5 plus an absolute floor of 1e-6 * max|expected| (and an optional elementwise
    slack). Where that fails and an fp64 `oracle` is given, the tensor still passes when the problem is
    ill-conditioned in fp32 itself: e.g. sum goodness of a wide layer near the threshold, where one
    rounding of g moves the loss terms by 1e-4 relative; then our error may be at most twice the fp32
    reference's (the FlashAttention-style rule of the low-precision tests)."""
    expected = expected.to(actual.dtype)
    allowed = 1e-5 * expected.abs() + 1e-6 * expected.abs().max()
    if slack is not None:
        allowed = allowed + slack
    diff = (actual - expected).abs()
    if bool((diff <= allowed).all()):
        return
    i = int((diff - allowed).argmax())
    msg = (f"{what}: {int((diff > allowed).sum())} of {diff.numel()} elements differ from the fp32 reference; "
           f"worst {actual.flatten()[i].item()!r} vs {expected.flatten()[i].item()!r} "
           f"(allowed {allowed.flatten()[i].item():.3g})")
    if oracle is None:
        raise AssertionError(msg)
    _assert_within_reference_error(msg + ", and", actual, expected, oracle, torch.float32)


def _adam_rounding_slack(p_before, grad, exp_avg_sq, cfg: FFConfig, step: int):
    """How far fp32 rounding alone can move one Adam step, elementwise.

    Adam moves p by step_size * m / (sqrt(v) / sqrt(bc2) + eps). Where the decayed gradient g + wd * p
    cancels to about eps, a few roundings of it (computed with or without FMA, by us or by torch)
    change the step by up to step_size * (1 - beta1) * rounding / denom: a sizeable part of lr for a
    handful of elements, nothing elsewhere.
    """
    b1, b2 = cfg.betas
    step_size = cfg.lr / (1 - b1 ** step)
    denom = exp_avg_sq.sqrt() / (1 - b2 ** step) ** 0.5 + cfg.eps
    rounding = 4 * torch.finfo(torch.float32).eps * (grad.abs() + cfg.weight_decay * p_before.abs())
    return step_size * (1 - b1) * rounding / denom


def _check_fp32_training(B, K, N, loss_opts, optim_opts, bias):
    """Several steps; at each one the kernels' outputs and gradient are checked against autograd (fp32,
    and fp64 where fp32 is ill-conditioned), and the update against FFLayerRef's torch.optim applied to
    that same gradient (Adam's first steps are
    about lr * sign(grad): a rounding-level gradient difference on a near-zero entry would otherwise
    show up as a full step)."""
    layer, oracle = _layer_pair(K, N, bias, loss_opts, optim_opts)
    params = [("weight", layer.weight, oracle.weight)] + ([("bias", layer.bias, oracle.bias)] if bias else [])
    for step in range(1, STEPS + 1):
        x_pos, x_neg = _inputs(B, K)
        grad = layer.ff_grad(x_pos, x_neg)
        oracle.optimizer.zero_grad(set_to_none=True)
        want = ref.ff_objective(x_pos, x_neg, oracle.weight, oracle.bias, oracle.cfg)
        want.loss.backward()
        exact = ref.ff_grad(x_pos.double(), x_neg.double(), oracle.weight.double(),
                            oracle.bias.double() if bias else None, oracle.cfg)
        for name in want._fields:
            _assert_fp32_close(getattr(grad, name), getattr(want, name).detach(), f"step {step} {name}",
                               oracle=getattr(exact, name))
        for pname, _, p_ref in params:
            _assert_fp32_close(getattr(grad, f"grad_{pname}"), p_ref.grad, f"step {step} grad_{pname}",
                               oracle=getattr(exact, f"grad_{pname}"))

        out = layer.ff_step(x_pos, x_neg)  # the fused step computes exactly what ff_grad computed
        for name in out._fields:
            assert torch.equal(getattr(out, name), getattr(grad, name)), f"step {step}: ff_step {name} != ff_grad's"
        before = {pname: p_ref.detach().clone() for pname, _, p_ref in params}
        for pname, _, p_ref in params:
            p_ref.grad = getattr(grad, f"grad_{pname}").clone()
        oracle.optimizer.step()
        for pname, p, p_ref in params:
            slack = None
            if layer.config.optimizer == "adam":
                slack = _adam_rounding_slack(before[pname], p_ref.grad, oracle.state_of(p_ref)["exp_avg_sq"],
                                             layer.config, step)
            _assert_fp32_close(p.detach(), p_ref.detach(), f"step {step} {pname}", slack)
            st = oracle.state_of(p_ref)
            for sname in layer.config.state_names:
                _assert_fp32_close(getattr(layer, f"{sname}_{pname}"), st[sname], f"step {step} {sname}_{pname}")
            # the next step starts both from our parameters and state: rounding-level differences would
            # otherwise grow through the loss (symba's alpha, Adam's near-eps entries) and hide real ones
            with torch.no_grad():
                p_ref.copy_(p)
                for sname in layer.config.state_names:
                    st[sname].copy_(getattr(layer, f"{sname}_{pname}"))


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("opts", ALL_OPTIONS, ids=_options_id)
def test_fp32_every_option_matches_reference(ieee_fp32, opts):
    loss_opts, optim_opts, bias = opts
    _check_fp32_training(7, 17, 128, loss_opts, optim_opts, bias)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("B,K,N", SHAPES, ids=lambda v: str(v))
def test_fp32_every_shape_matches_reference(ieee_fp32, B, K, N):
    # the options rotate with the shape, so each shape also exercises a different option combination
    loss_opts, optim_opts, bias = ALL_OPTIONS[(SHAPES.index((B, K, N)) * 37) % len(ALL_OPTIONS)]
    _check_fp32_training(B, K, N, loss_opts, optim_opts, bias)


# ---- float16 / bfloat16 ------------------------------------------------------------------------------

LOWP = [torch.float16, torch.bfloat16]
LOWP_SHAPES = [(1, 17, 128), (7, 784, 17), (64, 128, 784)]


def _lowp_reference_update(params, grads, states, step, cfg):
    """torch.optim on fp32 copies with fp32 state, rounded back: the update the design specifies."""
    params32 = [p.float() for p in params]
    ref.optimizer_update(params32, [g.float() for g in grads], states, step, cfg)
    for p, p32 in zip(params, params32):
        p.copy_(p32)


def _state_like(p, cfg):
    return tuple(torch.zeros_like(p, dtype=torch.float32) for _ in cfg.state_names)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("B,K,N", LOWP_SHAPES, ids=str)
@pytest.mark.parametrize("loss_opts", LOSS_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_lowp_grad_within_reference_error(dtype, B, K, N, loss_opts):
    torch.manual_seed(1)
    cfg = FFConfig(threshold=FFConfig.default_threshold(loss_opts["goodness"], N), **loss_opts)
    w = (torch.rand(N, K, device="cuda") * 2 - 1).div(K ** 0.5).to(dtype)
    b = (torch.rand(N, device="cuda") * 2 - 1).div(K ** 0.5).to(dtype)
    x_pos, x_neg = _inputs(B, K, dtype)
    ours = functional.ff_grad(x_pos, x_neg, w, b, cfg, backend="cuda")
    same = ref.ff_grad(x_pos, x_neg, w, b, cfg)
    oracle = ref.ff_grad(x_pos.double(), x_neg.double(), w.double(), b.double(), cfg)
    for i, name in enumerate(ours._fields):
        assert getattr(ours, name).dtype == dtype, f"{name} is returned in the input dtype"
        _assert_within_reference_error(name, ours[i], same[i], oracle[i], dtype)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("optim_opts", OPTIM_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_lowp_update_matches_fp32_state_reference(dtype, optim_opts):
    # each step starts both from our parameters and state, so one rounding apart stays one rounding apart
    torch.manual_seed(2)
    cfg = FFConfig(**optim_opts)
    w = torch.randn(33, 17, device="cuda").to(dtype)
    b = torch.randn(33, device="cuda").to(dtype)
    st_w, st_b = _state_like(w, cfg), _state_like(b, cfg)
    for step in range(1, STEPS + 1):
        gw, gb = torch.randn_like(w) * 1e-2, torch.randn_like(b) * 1e-2
        w_ref, b_ref = w.clone(), b.clone()
        st_w_ref, st_b_ref = tuple(s.clone() for s in st_w), tuple(s.clone() for s in st_b)
        functional.ff_update(w, b, gw, gb, st_w, st_b, step, cfg, backend="cuda")
        _lowp_reference_update([w_ref, b_ref], [gw, gb], [st_w_ref, st_b_ref], step, cfg)
        eps = torch.finfo(dtype).eps
        for what, got, want in (("weight", w, w_ref), ("bias", b, b_ref)):  # at most one rounding apart
            torch.testing.assert_close(got.float(), want.float(), rtol=eps, atol=1e-6, msg=lambda m: f"{what}: {m}")
        for got, want in zip(st_w + st_b, st_w_ref + st_b_ref):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("B,K,N", LOWP_SHAPES, ids=str)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lowp_training_within_reference_error(dtype, B, K, N, momentum):
    # SGD keeps the update linear in the gradient, so errors compare step after step (Adam's first
    # steps are ~lr * sign(grad), which amplifies any rounding of near-zero gradient entries)
    torch.manual_seed(3)
    cfg = FFConfig(threshold=float(N), optimizer="sgd", lr=0.05, momentum=momentum)
    w64 = (torch.rand(N, K, device="cuda", dtype=torch.float64) * 2 - 1) / K ** 0.5
    b64 = (torch.rand(N, device="cuda", dtype=torch.float64) * 2 - 1) / K ** 0.5
    w, b = w64.to(dtype), b64.to(dtype)
    w64, b64 = w.double(), b.double()
    w_same, b_same = w.clone(), b.clone()
    st = {k: (_state_like(w, cfg), _state_like(b, cfg)) for k in ("ours", "same")}
    st64 = tuple(tuple(torch.zeros_like(p) for _ in cfg.state_names) for p in (w64, b64))
    for step in range(1, STEPS + 1):
        x_pos, x_neg = _inputs(B, K, dtype)
        ours = functional.ff_step(x_pos, x_neg, w, b, *st["ours"], step, cfg, backend="cuda")
        same = ref.ff_grad(x_pos, x_neg, w_same, b_same, cfg)
        _lowp_reference_update([w_same, b_same], [same.grad_weight, same.grad_bias], st["same"], step, cfg)
        oracle = ref.ff_grad(x_pos.double(), x_neg.double(), w64, b64, cfg)
        ref.optimizer_update([w64, b64], [oracle.grad_weight, oracle.grad_bias], st64, step, cfg)
        for i, name in enumerate(ours._fields):
            _assert_within_reference_error(f"step {step} {name}", ours[i], same[i], oracle[i], dtype)
        _assert_within_reference_error(f"step {step} weight", w, w_same, w64, dtype)
        _assert_within_reference_error(f"step {step} bias", b, b_same, b64, dtype)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_state_dtype_for_lowp_params(dtype):
    layer = ffkernels.FFLinear(17, 9, backend="cuda", device="cuda", dtype=dtype)
    layer.ff_step(*_inputs(4, 17, dtype))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("exp_avg_weight", "exp_avg_sq_weight", "exp_avg_bias", "exp_avg_sq_bias"):
        buf = getattr(layer, name)
        assert buf.dtype == want and buf.device.type == "cuda", name
        assert buf.abs().sum() > 0, f"{name} was not updated"


# ---- non-finite losses, determinism ---------------------------------------------------------------------

def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("how", ["nan-input", "inf-input", "overflow"])
def test_non_finite_loss_changes_nothing(dtype, optimizer, how):
    layer = ffkernels.FFLinear(16, 8, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                               backend="cuda", device="cuda", dtype=dtype)
    layer.ff_step(*_inputs(4, 16, dtype))  # non-zero state first
    x_pos, x_neg = _inputs(4, 16, dtype)
    if how == "nan-input":
        x_neg[2, 3] = float("nan")
    elif how == "inf-input":
        x_pos[0, 0] = float("inf")
    else:  # finite inputs, but h^2 overflows: g_neg = inf
        x_neg = x_neg.abs()
        with torch.no_grad():
            layer.weight.fill_(torch.finfo(dtype).max / 4)
    before, step_count = _snapshot(layer), layer.step_count
    # the op itself: runs without a host sync, leaves everything as it was, returns the bad loss
    out = functional.ff_step(x_pos, x_neg, layer.weight, layer.bias, layer._states("weight"),
                             layer._states("bias"), layer.step_count + 1, layer.config, backend="cuda")
    assert not torch.isfinite(out.loss)
    after = _snapshot(layer)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # the module raises and changes nothing either
    with pytest.raises(NonFiniteLossError):
        layer.ff_step(x_pos, x_neg)
    assert layer.step_count == step_count
    for k, v in _snapshot(layer).items():
        assert torch.equal(before[k], v), k


@gpu
@needs_cuda_backend
def test_update_skipped_for_non_finite_loss_of_another_dtype():
    cfg = FFConfig()
    w = torch.randn(5, 3, device="cuda")
    st = _state_like(w, cfg)
    w0 = w.clone()
    for loss in (torch.tensor(float("nan"), device="cuda", dtype=torch.float64),
                 torch.tensor(float("inf"), device="cuda", dtype=torch.bfloat16)):
        functional.ff_update(w, None, torch.ones_like(w), None, st, (), 1, cfg, loss=loss, backend="cuda")
        assert torch.equal(w, w0) and all(s.abs().sum() == 0 for s in st)
    functional.ff_update(w, None, torch.ones_like(w), None, st, (), 1, cfg,
                         loss=torch.tensor(2, device="cuda"), backend="cuda")  # an integer loss is finite
    assert not torch.equal(w, w0)


@gpu
@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_is_bitwise_reproducible(dtype):
    torch.manual_seed(4)
    w = torch.randn(300, 200, device="cuda", dtype=dtype) / 15
    b = torch.randn(300, device="cuda", dtype=dtype) / 15
    x_pos, x_neg = _inputs(513, 200, dtype)
    first = functional.ff_grad(x_pos, x_neg, w, b, backend="cuda")
    for _ in range(3):
        again = functional.ff_grad(x_pos, x_neg, w, b, backend="cuda")
        for name, a, c in zip(first._fields, first, again):
            assert torch.equal(a, c), name
