"""The Triton backend (ffkernels.triton_backend) against the reference.

On the CPU these tests run the kernels under the Triton interpreter, as their own pytest process:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py

The variable is not set from inside the test suite: Triton reads it when the kernels are defined (the
first import of ffkernels.triton_backend), and it changes what ffkernels reports as available for the
whole process, so setting it here would leak into every test module that runs after this one. Without
it the interpreter tests skip, saying so; on a CUDA machine the GPU tests (marked ``gpu``) run instead.

Tolerances (shared/DESIGN.md "Checking rules"): every compared tensor T must satisfy
    max|T - R64| <= 2 * max|R - R64| + rtol * max|R64|
where R64 is the reference in float64 and R the reference in T's precision (FlashAttention's rule,
with rtol = 1e-5 for float32). The first term is the precision's own noise: e.g. the symba loss
amplifies goodness rounding by alpha, and Adam turns a gradient that is zero up to rounding into a
full-size step of either sign, in the fp32 reference just as in any fp32 kernel.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import ffkernels  # noqa: E402
from ffkernels import reference as ref  # noqa: E402
from ffkernels._types import BackendUnavailableError, NonFiniteLossError  # noqa: E402
from ffkernels.backends import BACKENDS, resolve_backend  # noqa: E402
from ffkernels.config import FFConfig  # noqa: E402
from ffkernels.triton_backend.ff_math import sigmoid, softplus  # noqa: E402
from ffkernels.triton_backend.settings import set_fp32_precision  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
RUN_INTERPRETER = "TRITON_INTERPRET=1 python -m pytest tests/test_triton.py"

interpreter = pytest.mark.skipif(not INTERPRET, reason=f"Triton interpreter tests: run `{RUN_INTERPRETER}`")
gpu_only = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """The interpreter runs each program's tl.dot as a small numpy matmul; a multi-threaded BLAS on busy
    cores makes those hundreds of times slower (sync overhead), so keep numpy's BLAS on one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


TRITON = BACKENDS["triton"]
NORMS, GOODNESS, LOSSES = ("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba")
OPTIMIZERS = {  # every optimizer path: Adam with/without coupled weight decay, SGD plain/momentum/both
    "adam": dict(optimizer="adam", lr=3e-3),
    "adam-wd": dict(optimizer="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    "sgd": dict(optimizer="sgd", lr=0.05),
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9),
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.02, momentum=0.5, weight_decay=0.1),
}
SHAPES = [(1, 1, 1), (7, 17, 17), (64, 128, 128), (7, 128, 17), (64, 17, 1), (1, 17, 128), (7, 1, 128),
          (64, 128, 17)]  # (B, K, N): odd and even, single-tile and multi-tile in each dimension
BIG_SHAPES = [(7, 784, 17), (7, 17, 784), (64, 784, 784)]  # several K- and N-tiles (128-wide under the interpreter)


# ---- helpers ---------------------------------------------------------------------------------------------

def make_config(goodness="sum", N=1, **kw) -> FFConfig:
    """FFConfig with FFLinear's default threshold for ``goodness`` and width ``N``."""
    return FFConfig(goodness=goodness, threshold=FFConfig.default_threshold(goodness, N), **kw)


def make_layer_params(K, N, bias, seed, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias)
    w = lin.weight.detach().to(device=device, dtype=dtype).contiguous()
    b = lin.bias.detach().to(device=device, dtype=dtype).contiguous() if bias else None
    return w, b


def make_batch(B, K, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_pos = torch.randn(B, K, generator=g) + 0.5
    x_neg = 1.5 * torch.randn(B, K, generator=g)
    return x_pos.to(device=device, dtype=dtype), x_neg.to(device=device, dtype=dtype)


def zero_states(param, cfg):
    return tuple(torch.zeros_like(param, dtype=torch.float32) for _ in cfg.state_names) if param is not None else ()


def check(name, actual, ref_same, ref64, rtol=1e-5, scale=None):
    """max|actual - ref64| <= 2 max|ref_same - ref64| + rtol * scale, scale = max|ref64| unless given (see the
    module docstring)."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    truth = ref64.double()
    err = (actual.double() - truth).abs().max().item() if truth.numel() else 0.0
    ref_err = (ref_same.double() - truth).abs().max().item() if truth.numel() else 0.0
    if scale is None:
        scale = truth.abs().max().item() if truth.numel() else 0.0
    bound = 2 * ref_err + rtol * scale
    assert err <= bound, (f"{name}: max error {err:.3e} vs float64 reference exceeds {bound:.3e} "
                          f"(reference's own error {ref_err:.3e}, scale {scale:.3e})")


def loss_scale(out64, cfg) -> float:
    """The loss's change under relative perturbations of the goodness, sum_i |dL/dg_i| |g_i| (+ |L|): a tiny loss
    of well-separated pairs (e.g. 1e-11) can still move by 1e-5 of this when every g is 1e-7 off."""
    g_pos, g_neg = out64.g_pos.detach().requires_grad_(True), out64.g_neg.detach().requires_grad_(True)
    with torch.enable_grad():
        d_pos, d_neg = torch.autograd.grad(ref.ff_loss(g_pos, g_neg, cfg), [g_pos, g_neg])
    return ((d_pos * g_pos).abs().sum() + (d_neg * g_neg).abs().sum() + out64.loss.abs()).item()


def check_outputs(prefix, out, r32, r64, cfg, rtol=1e-5):
    """Compare loss, h_pos, h_neg, g_pos, g_neg (and gradients, when present) with check()."""
    for field, a, r, t in zip(out._fields, out, r32, r64):
        if t is not None:
            check(f"{prefix}{field}", a, r, t, rtol, scale=loss_scale(r64, cfg) if field == "loss" else None)


def run_trajectory(B, K, N, bias, cfg, steps, seed=0):
    """``steps`` fused Triton steps against FFLayerRef (its own torch.optim) in float32 and float64."""
    w, b = make_layer_params(K, N, bias, seed)
    ref32, ref64 = ref.FFLayerRef(w, b, cfg), ref.FFLayerRef(w.double(), b.double() if bias else None, cfg)
    w, b = w.clone(), b.clone() if bias else None
    st_w, st_b = zero_states(w, cfg), zero_states(b, cfg)
    for step in range(1, steps + 1):
        x_pos, x_neg = make_batch(B, K, seed + step)
        out = TRITON.step(x_pos, x_neg, w, b, st_w, st_b, step, cfg)
        r32 = ref32.step(x_pos, x_neg)
        r64 = ref64.step(x_pos.double(), x_neg.double())
        check_outputs(f"step {step} ", out, r32, r64, cfg)
        params = [("weight", w, st_w, ref32.weight, ref64.weight)]
        if bias:
            params.append(("bias", b, st_b, ref32.bias, ref64.bias))
        for pname, p, states, p32, p64 in params:
            check(f"step {step} {pname}", p, p32.detach(), p64.detach())
            for sname, s in zip(cfg.state_names, states):
                check(f"step {step} {sname} of {pname}", s, ref32.state_of(p32)[sname], ref64.state_of(p64)[sname])


# ---- the fused step against the reference, every option -----------------------------------------------------

COMBOS = list(itertools.product(NORMS, GOODNESS, LOSSES, OPTIMIZERS))
# each combination once, on a shape and bias setting that cycle (8 shapes x 3 bias phases: every shape gets both)
CASES = [(combo, SHAPES[i % len(SHAPES)], i % 3 != 0, i) for i, combo in enumerate(COMBOS)]


@interpreter
@pytest.mark.parametrize("combo,shape,bias,seed", CASES, ids=[
    f"{'-'.join(c)}-{'x'.join(map(str, s))}-{'bias' if b else 'nobias'}" for c, s, b, _ in CASES])
def test_step_matches_reference(combo, shape, bias, seed):
    norm, goodness, loss, opt = combo
    B, K, N = shape
    cfg = make_config(goodness, N, norm=norm, loss=loss, **OPTIMIZERS[opt])
    run_trajectory(B, K, N, bias, cfg, steps=3, seed=100 * seed)


@interpreter
@pytest.mark.parametrize("shape", BIG_SHAPES, ids=["x".join(map(str, s)) for s in BIG_SHAPES])
def test_step_matches_reference_784(shape):
    B, K, N = shape
    cfg = make_config("sum", N, norm="rms", loss="symba" if N == 784 else "hinton", **OPTIMIZERS["adam-wd"])
    run_trajectory(B, K, N, True, cfg, steps=2)


# ---- gradient and update on their own -------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("norm,goodness,loss", list(itertools.product(NORMS, GOODNESS, LOSSES)))
def test_grad_matches_reference(norm, goodness, loss):
    B, K, N = 7, 33, 19
    bias = norm != "l2"
    # non-default norm_eps / symba_alpha: a misplaced eps (default 1e-8) would be invisible in float32
    cfg = make_config(goodness, N, norm=norm, loss=loss, norm_eps=0.1, symba_alpha=2.5)
    w, b = make_layer_params(K, N, bias, seed=1)
    x_pos, x_neg = make_batch(B, K, seed=2)
    out = TRITON.grad(x_pos, x_neg, w, b, cfg)
    r32 = ref.ff_grad(x_pos, x_neg, w, b, cfg)
    r64 = ref.ff_grad(x_pos.double(), x_neg.double(), w.double(), b.double() if bias else None, cfg)
    assert (out.grad_bias is None) == (not bias)
    check_outputs("", out, r32, r64, cfg)


@interpreter
def test_grad_of_noncontiguous_inputs():
    """Strided inputs (not updated in place) are accepted and give the same results as contiguous ones."""
    cfg = make_config("sum", 19)
    w, b = make_layer_params(33, 19, True, seed=9)
    x_pos, x_neg = make_batch(7, 66, seed=9)
    strided = TRITON.grad(x_pos[:, ::2], x_neg[:, 1::2], w.t().contiguous().t(), b, cfg)
    dense = TRITON.grad(x_pos[:, ::2].contiguous(), x_neg[:, 1::2].contiguous(), w, b, cfg)
    for field, a, e in zip(dense._fields, strided, dense):
        assert torch.equal(a, e), field


@interpreter
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_update_matches_torch_optim(opt):
    """ff_update with given gradients against torch.optim on the same gradients (several steps)."""
    cfg = make_config(**OPTIMIZERS[opt])
    w, b = make_layer_params(37, 21, True, seed=3)
    params = {dt: [w.to(dt, copy=True), b.to(dt, copy=True)] for dt in (torch.float64, torch.float32)}
    states = {dt: [zero_states(p, cfg) if dt == torch.float32 else tuple(torch.zeros_like(p) for _ in cfg.state_names)
                   for p in params[dt]] for dt in params}
    mine, my_states = [w.clone(), b.clone()], [zero_states(w, cfg), zero_states(b, cfg)]
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=gen) * 10.0 ** -step for p in mine]
        TRITON.update(mine[0], mine[1], grads[0], grads[1], my_states[0], my_states[1], step, cfg)
        for dt in params:
            ref.optimizer_update(params[dt], [g.to(dt) for g in grads], states[dt], step, cfg)
        for i, name in enumerate(("weight", "bias")):
            check(f"step {step} {name}", mine[i], params[torch.float32][i], params[torch.float64][i], rtol=1e-6)
            for s, s32, s64, sname in zip(my_states[i], states[torch.float32][i], states[torch.float64][i],
                                           cfg.state_names):
                check(f"step {step} {sname} of {name}", s, s32, s64, rtol=1e-6)


@interpreter
@pytest.mark.parametrize("opt", ["adam-wd", "sgd-momentum-wd", "sgd"])
def test_fused_step_equals_grad_then_update(opt):
    """The fused step (optimizer in kernel 3's epilogue) is exactly ff_grad followed by ff_update."""
    B, K, N = 7, 130, 20  # two K-tiles
    cfg = make_config("mean", N, loss="symba", **OPTIMIZERS[opt])
    w, b = make_layer_params(K, N, True, seed=5)
    fused = [w.clone(), b.clone(), zero_states(w, cfg), zero_states(b, cfg)]
    split = [w.clone(), b.clone(), zero_states(w, cfg), zero_states(b, cfg)]
    for step in range(1, 4):
        x_pos, x_neg = make_batch(B, K, seed=10 + step)
        out = TRITON.step(x_pos, x_neg, *fused, step, cfg)
        g = TRITON.grad(x_pos, x_neg, split[0], split[1], cfg)
        TRITON.update(split[0], split[1], g.grad_weight, g.grad_bias, split[2], split[3], step, cfg, loss=g.loss)
        for a, e in zip(out, g):
            assert torch.equal(a, e)
        for a, e in zip(fused[:2] + list(fused[2]) + list(fused[3]), split[:2] + list(split[2]) + list(split[3])):
            assert torch.equal(a, e)


# ---- a non-finite loss changes nothing ------------------------------------------------------------------------

def _snapshot(*tensors):
    return [t.clone() for t in tensors]


@interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, making the inf on purpose
@pytest.mark.parametrize("opt", ["adam", "sgd-momentum"])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_step_with_nonfinite_loss_changes_nothing(opt, poison):
    B, K, N = 7, 17, 33
    cfg = make_config("sum", N, norm="none" if poison == "inf" else "rms", **OPTIMIZERS[opt])
    w, b = make_layer_params(K, N, True, seed=6)
    st_w, st_b = zero_states(w, cfg), zero_states(b, cfg)
    x_pos, x_neg = make_batch(B, K, seed=7)
    TRITON.step(x_pos, x_neg, w, b, st_w, st_b, 1, cfg)  # a finite step first: non-zero state
    before = _snapshot(w, b, *st_w, *st_b)
    if poison == "nan":
        x_pos[3, 5] = float("nan")
    else:
        x_neg[2] = 1e30  # finite input, infinite goodness (no normalization)
    out = TRITON.step(x_pos, x_neg, w, b, st_w, st_b, 2, cfg)
    assert not torch.isfinite(out.loss)
    for a, e in zip([w, b, *st_w, *st_b], before):
        assert torch.equal(a, e)


@interpreter
@pytest.mark.parametrize("loss_value", [float("nan"), float("inf"), -float("inf")])
def test_update_skipped_when_given_loss_not_finite(loss_value):
    cfg = make_config(**OPTIMIZERS["adam"])
    w, b = make_layer_params(17, 9, True, seed=8)
    st_w, st_b = zero_states(w, cfg), zero_states(b, cfg)
    before = _snapshot(w, b, *st_w, *st_b)  # weight, bias, exp_avg, exp_avg_sq of weight, then of bias
    gw, gb = torch.ones_like(w), torch.ones_like(b)
    TRITON.update(w, b, gw, gb, st_w, st_b, 1, cfg, loss=torch.tensor(loss_value))
    for a, e in zip([w, b, *st_w, *st_b], before):
        assert torch.equal(a, e)
    TRITON.update(w, b, gw, gb, st_w, st_b, 1, cfg, loss=torch.tensor(0.5))  # a finite loss does update
    assert not torch.equal(w, before[0]) and not torch.equal(st_w[1], before[3])


# ---- FFLinear(backend="triton") end to end ------------------------------------------------------------------

@interpreter
def test_fflinear_triton_end_to_end():
    kw = dict(goodness="mean", loss="symba", norm="l2", optimizer="adam", lr=1e-2, weight_decay=0.01)
    layer = ffkernels.FFLinear(40, 24, backend="triton", **kw)
    assert layer.backend == "triton"
    oracle = ffkernels.FFLinear(40, 24, backend="reference", **kw)
    oracle.load_state_dict(layer.state_dict())
    truth = ffkernels.FFLinear(40, 24, backend="reference", dtype=torch.float64, **kw)
    truth.load_state_dict(layer.state_dict())
    for step in range(1, 4):
        x_pos, x_neg = make_batch(6 * 5, 40, seed=20 + step)
        x_pos, x_neg = x_pos.view(6, 5, 40), x_neg.view(6, 5, 40)  # leading batch dims are flattened
        out, r32, r64 = layer.ff_step(x_pos, x_neg), oracle.ff_step(x_pos, x_neg), truth.ff_step(
            x_pos.double(), x_neg.double())
        assert out.h_pos.shape == (6, 5, 24) and out.g_neg.shape == (6, 5)
        check_outputs(f"step {step} ", out, r32, r64, layer.config)
        for (name, a), r, t in zip(layer.state_dict().items(), oracle.state_dict().values(),
                                   truth.state_dict().values()):
            if isinstance(a, torch.Tensor):
                check(f"step {step} {name}", a, r, t)
    assert layer.step_count == 3


@interpreter
def test_fflinear_triton_nonfinite_loss_raises_and_keeps_state():
    layer = ffkernels.FFLinear(16, 8, backend="triton", optimizer="sgd", momentum=0.9, lr=0.1)
    x_pos, x_neg = make_batch(4, 16, seed=30)
    layer.ff_step(x_pos, x_neg)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    x_pos[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite"):
        layer.ff_step(x_pos, x_neg)
    assert layer.step_count == 1
    for k, v in before.items():
        assert torch.equal(layer.state_dict()[k], v), k


@interpreter
def test_fflinear_triton_grad_then_update_equals_step():
    a = ffkernels.FFLinear(20, 12, backend="triton", optimizer="adam", lr=1e-2)
    b = ffkernels.FFLinear(20, 12, backend="triton", optimizer="adam", lr=1e-2)
    b.load_state_dict(a.state_dict())
    for step in range(2):
        x_pos, x_neg = make_batch(5, 20, seed=40 + step)
        a.ff_step(x_pos, x_neg)
        g = b.ff_grad(x_pos, x_neg)
        b.ff_update(g.grad_weight, g.grad_bias, loss=g.loss)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k


# ---- the Triton math helpers at extreme arguments ------------------------------------------------------------

@triton.jit
def _softplus_sigmoid_kernel(x_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(sp_ptr + offs, softplus(x), mask=offs < n)
    tl.store(sg_ptr + offs, sigmoid(x), mask=offs < n)


@interpreter
def test_softplus_and_sigmoid_are_stable_and_accurate():
    """No overflow for large |x|, full relative accuracy where the value is tiny (log1p without libdevice)."""
    x = torch.tensor([-200.0, -80.0, -30.0, -17.0, -1e-3, 0.0, 1e-7, 0.5, 17.0, 30.0, 80.0, 200.0, float("nan")])
    sp, sg = torch.empty_like(x), torch.empty_like(x)
    _softplus_sigmoid_kernel[(1,)](x, sp, sg, x.numel(), BLOCK=16)
    x64 = x.double()  # float64 truth rounded to float32; within 2 float32 ulps
    torch.testing.assert_close(sp, torch.nn.functional.softplus(x64).float(), rtol=3e-7, atol=0, equal_nan=True)
    torch.testing.assert_close(sg, torch.sigmoid(x64).float(), rtol=3e-7, atol=0, equal_nan=True)


# ---- torch.library: schemas, fake kernels, torch.compile ------------------------------------------------------

def _op_args(bias=True, opt="adam"):
    cfg = make_config("sum", 19, **OPTIMIZERS[opt])
    w, b = make_layer_params(33, 19, bias, seed=50)
    x_pos, x_neg = make_batch(7, 33, seed=51)
    sw = list(zero_states(w, cfg)) + [None] * (2 - len(cfg.state_names))
    sb = (list(zero_states(b, cfg)) + [None] * (2 - len(cfg.state_names))) if bias else [None, None]
    return cfg, x_pos, x_neg, w, b, sw, sb


@interpreter
@pytest.mark.parametrize("bias,opt", [(True, "adam"), (False, "sgd-momentum"), (True, "sgd")])
def test_opcheck(bias, opt):
    cfg, x_pos, x_neg, w, b, sw, sb = _op_args(bias, opt)
    ops = torch.ops.ffkernels_triton
    torch.library.opcheck(ops.ff_grad.default, (x_pos, x_neg, w, b, *cfg.loss_args()))
    torch.library.opcheck(ops.ff_step.default, (x_pos, x_neg, w, b, *sw, *sb, 2, *cfg.loss_args(),
                                                *cfg.optim_args()))
    g = ops.ff_grad(x_pos, x_neg, w, b, *cfg.loss_args())
    torch.library.opcheck(ops.ff_update.default, (w, b, g[5], g[6] if bias else None, *sw, *sb, g[0], 2,
                                                  *cfg.optim_args()))


def _compiled_step_matches_eager(cfg, tensors, compile_kw):
    """torch.compile(fullgraph) of an ff_step call gives the eager outputs and the same in-place update;
    returns (compiled outputs + args, eager outputs + args)."""
    def train(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b):
        out = torch.ops.ffkernels_triton.ff_step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, 1, *cfg.loss_args(),
                                                 *cfg.optim_args())
        return out[0] * 2.0, out[1].sum(-1)

    eager_args = [t.clone() for t in tensors]
    compiled_args = [t.clone() for t in eager_args]
    expected = train(*eager_args)
    got = torch.compile(train, fullgraph=True, **compile_kw)(*compiled_args)
    assert not torch.equal(compiled_args[2], tensors[2])  # the in-place update happened in the compiled graph
    return list(got) + compiled_args, list(expected) + eager_args


@interpreter
def test_torch_compile_fullgraph_matches_eager():
    cfg, x_pos, x_neg, w, b, sw, sb = _op_args(True, "adam-wd")
    got, expected = _compiled_step_matches_eager(cfg, (x_pos, x_neg, w, b, *sw, *sb), {"backend": "aot_eager"})
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


# ---- bad input gets a clear error --------------------------------------------------------------------------------

@interpreter
def test_bad_input_messages():
    cfg, x_pos, x_neg, w, b, sw, sb = _op_args(True, "adam")
    ops = torch.ops.ffkernels_triton
    with pytest.raises(BackendUnavailableError, match="float64"):
        resolve_backend("triton", "cpu", torch.float64)
    with pytest.raises(TypeError, match="supports float32 under the Triton interpreter, got float64"):
        ops.ff_grad(x_pos.double(), x_neg.double(), w.double(), b.double(), *cfg.loss_args())
    with pytest.raises(TypeError, match="supports float32 under the Triton interpreter, got float64"):
        ops.ff_update(w.double(), None, w.double(), None, *sw, None, None, None, 1, *cfg.optim_args())
    with pytest.raises(ValueError, match="same batch size"):
        ops.ff_grad(x_pos, x_neg[:3], w, b, *cfg.loss_args())
    with pytest.raises(ValueError, match="in_features=33"):
        ops.ff_grad(x_pos[:, :5], x_neg[:, :5], w, b, *cfg.loss_args())
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        ops.ff_grad(x_pos, x_neg, w, b, "batch", *cfg.loss_args()[1:])
    with pytest.raises(ValueError, match="weight must be contiguous"):
        ops.ff_step(x_pos, x_neg, w.t().contiguous().t(), b, *sw, *sb, 1, *cfg.loss_args(), *cfg.optim_args())
    with pytest.raises(ValueError, match="needs exp_avg_sq \\(weight\\)"):
        ops.ff_step(x_pos, x_neg, w, b, sw[0], None, *sb, 1, *cfg.loss_args(), *cfg.optim_args())
    with pytest.raises(TypeError, match="exp_avg \\(bias\\) must be float32, got float64"):
        ops.ff_step(x_pos, x_neg, w, b, *sw, sb[0].double(), sb[1], 1, *cfg.loss_args(), *cfg.optim_args())
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.ff_update(w, b, w, b, *sw, *sb, None, 0, *cfg.optim_args())
    with pytest.raises(ValueError, match="grad_bias must have shape"):
        ops.ff_update(w, b, w, w, *sw, *sb, None, 1, *cfg.optim_args())
    with pytest.raises(ValueError, match="unknown fp32 precision 'fp16'"):
        set_fp32_precision("fp16")


def test_triton_unavailable_on_cpu_without_interpreter():
    if INTERPRET or CUDA:
        pytest.skip("the error is for CPU-only machines without TRITON_INTERPRET=1")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ffkernels.FFLinear(4, 3, backend="triton").backend


# ---- the GPU path on a CPU-only machine: compiles for sm_80/sm_90, and torch.compile sees the kernels -----------

_GPU_PATH_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ffkernels.config import FFConfig
    from ffkernels.triton_backend import ops
    from ffkernels.triton_backend.forward_kernel import ff_forward_kernel
    from ffkernels.triton_backend.loss_kernel import ff_loss_kernel
    from ffkernels.triton_backend.optim_args import NO_UPDATE, optim_args
    from ffkernels.triton_backend.update_kernel import ff_update_kernel
    from ffkernels.triton_backend.weight_grad_kernel import ff_weight_grad_kernel
    assert ops.TRACEABLE

    PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    def compile_for(kernel, arch, **args):  # signature from example arguments: dtype = a pointer to it
        sig, const = {}, {}
        for p, name in zip(kernel.params, kernel.arg_names):
            v = args[name]
            if p.is_constexpr or v is None:
                sig[name], const[name] = "constexpr", v
            else:
                sig[name] = PTR.get(v) or {bool: "i1", int: "i32", float: "fp32"}[type(v)]
        triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32))

    f32, bf16 = torch.float32, torch.bfloat16
    for arch, dt, norm, prec in ((90, f32, 2, "ieee"), (80, bf16, 0, "ieee"), (80, f32, 1, "tf32")):
        compile_for(ff_forward_kernel, arch, xp_ptr=dt, xn_ptr=dt, w_ptr=dt, b_ptr=dt if norm else None, hp_ptr=dt,
                    hn_ptr=dt, ss_part_ptr=f32, den_ptr=f32, B=70, N=90, K=100, norm_eps=1e-8, NORM=norm,
                    HAS_BIAS=bool(norm), INPUT_PRECISION=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    compile_for(ff_loss_kernel, 90, ss_part_ptr=f32, gp_ptr=bf16, gn_ptr=bf16, coef_ptr=f32, loss_ptr=bf16, B=70,
                N=90, num_tiles=2, threshold=1.0, symba_alpha=4.0, GOODNESS=1, LOSS=1, BLOCK=128)
    for arch, dt, up in ((90, f32, NO_UPDATE), (90, bf16, optim_args(3, "adam", 1e-3, 0.9, 0.99, 1e-8, 0.0, 0.1)),
                         (80, f32, optim_args(3, "sgd", 1e-3, 0.9, 0.99, 1e-8, 0.9, 0.0))):
        grads = dt if up is NO_UPDATE else None
        compile_for(ff_weight_grad_kernel, arch, xp_ptr=dt, xn_ptr=dt, hp_ptr=dt, hn_ptr=dt, coef_ptr=f32,
                    den_ptr=f32, loss_ptr=dt, w_ptr=dt, b_ptr=dt, gw_ptr=grads, gb_ptr=grads, s1w_ptr=f32, s2w_ptr=f32,
                    s1b_ptr=f32, s2b_ptr=f32, B=70, N=90, K=100, **up.scalars, NORM=2, HAS_BIAS=True, OPTIM=up.optim,
                    MOMENTUM=up.momentum_buffer, INPUT_PRECISION="ieee", BLOCK_N=64, BLOCK_K=32, BLOCK_B=32)
    up = optim_args(1, "sgd", 1e-3, 0.9, 0.99, 1e-8, 0.9, 0.01)
    compile_for(ff_update_kernel, 90, p_ptr=bf16, g_ptr=bf16, s1_ptr=f32, s2_ptr=None, loss_ptr=bf16, numel=1000,
                **up.scalars, OPTIM=up.optim, MOMENTUM=True, HAS_LOSS=True, BLOCK=1024)

    cfg = FFConfig(threshold=19.0)
    graphs = []
    def keep(gm, inputs):
        graphs.append(gm.code)
        return gm
    def step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b):
        return torch.ops.ffkernels_triton.ff_step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, 3, *cfg.loss_args(),
                                                  *cfg.optim_args())
    with FakeTensorMode():
        shapes = [(7, 33), (7, 33), (19, 33), (19,), (19, 33), (19, 33), (19,), (19,)]
        aot_function(step, fw_compiler=keep)(*[torch.empty(s, device="cuda") for s in shapes])
    code = graphs[0]
    assert code.count("triton_kernel_wrapper_functional(") == 3, code
    print("ok")
""")


@pytest.mark.skipif(INTERPRET, reason="needs the kernels as real JIT functions: run without TRITON_INTERPRET")
def test_gpu_path_compiles_and_is_traceable():
    """Without a GPU: every kernel variant compiles to sm_80/sm_90 code (bundled ptxas), and ff_step is a
    triton_op whose functionalized graph launches the three kernels (what torch.compile/inductor sees)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ffkernels.__file__)),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _GPU_PATH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-4000:]


# ---- GPU: every dtype against the same-precision reference -------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_CASES = [((64, 784, 512), make_config("sum", 512, norm="rms", loss="hinton", **OPTIMIZERS["adam"])),
             ((7, 17, 33), make_config("mean", 33, norm="l2", loss="symba", **OPTIMIZERS["sgd-momentum-wd"])),
             ((33, 200, 130), make_config("sum", 130, norm="none", loss="symba", **OPTIMIZERS["adam-wd"]))]
# float32 products on GPUs use exact fp32 ("ieee", the default), so float32 keeps the interpreter's rtol
GPU_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _reference_step_like_kernels(x_pos, x_neg, w, b, states_w, states_b, step, cfg):
    """The reference with the backend's precision rules: gradient by autograd in the parameter dtype, update in
    float32 (float64 for float64) on the upcast parameter with the state in that precision, rounded back."""
    g = ref.ff_grad(x_pos, x_neg, w, b, cfg)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    params = [w.to(acc), b.to(acc)] if b is not None else [w.to(acc)]
    grads = [g.grad_weight.to(acc)] + ([g.grad_bias.to(acc)] if b is not None else [])
    ref.optimizer_update(params, grads, [states_w, states_b][:len(params)], step, cfg)
    w.copy_(params[0])
    if b is not None:
        b.copy_(params[1])
    return g


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape,cfg", GPU_CASES, ids=["x".join(map(str, s)) for s, _ in GPU_CASES])
@pytest.mark.gpu
@gpu_only
def test_gpu_matches_same_precision_reference(dtype, shape, cfg):
    B, K, N = shape
    dev = "cuda"
    w0, b0 = make_layer_params(K, N, True, seed=60, dtype=torch.float64, device=dev)
    mine = [w0.to(dtype), b0.to(dtype), zero_states(w0, cfg), zero_states(b0, cfg)]
    low = [w0.to(dtype), b0.to(dtype), zero_states(w0, cfg), zero_states(b0, cfg)]
    truth = [w0.clone(), b0.clone(), tuple(torch.zeros_like(w0) for _ in cfg.state_names),
             tuple(torch.zeros_like(b0) for _ in cfg.state_names)]
    rtol = GPU_RTOL[dtype]
    for step in range(1, 4):
        x_pos, x_neg = make_batch(B, K, seed=61 + step, dtype=torch.float64, device=dev)
        g_mine = TRITON.grad(x_pos.to(dtype), x_neg.to(dtype), mine[0], mine[1], cfg)
        out = TRITON.step(x_pos.to(dtype), x_neg.to(dtype), *mine, step, cfg)
        g_low = _reference_step_like_kernels(x_pos.to(dtype), x_neg.to(dtype), *low, step, cfg)
        g_truth = _reference_step_like_kernels(x_pos, x_neg, *truth, step, cfg)
        check_outputs(f"{dtype} step {step} ", g_mine, g_low, g_truth, cfg, rtol=rtol)
        for field, a, e in zip(out._fields, out, g_mine):
            assert torch.equal(a, e), f"step and grad disagree on {field}"
        for name, a, r, t in (("weight", mine[0], low[0], truth[0]), ("bias", mine[1], low[1], truth[1])):
            check(f"{dtype} step {step} {name}", a, r, t, rtol=rtol)


@pytest.mark.gpu
@gpu_only
def test_gpu_backend_choice_and_fflinear():
    assert "triton" in ffkernels.available_backends()
    auto = resolve_backend("auto", "cuda", torch.float16)
    assert auto == ("cuda" if BACKENDS["cuda"].unavailable_reason() is None else "triton")
    layer = ffkernels.FFLinear(64, 32, backend="triton", device="cuda")
    oracle = ffkernels.FFLinear(64, 32, backend="reference", device="cuda")
    oracle.load_state_dict(layer.state_dict())
    truth = ffkernels.FFLinear(64, 32, backend="reference", device="cuda", dtype=torch.float64)
    truth.load_state_dict(layer.state_dict())
    for step in range(3):
        x_pos, x_neg = make_batch(16, 64, seed=70 + step, device="cuda")
        check_outputs(f"step {step} ", layer.ff_step(x_pos, x_neg), oracle.ff_step(x_pos, x_neg),
                      truth.ff_step(x_pos.double(), x_neg.double()), layer.config)
    check("weight", layer.weight.detach(), oracle.weight.detach(), truth.weight.detach())


@pytest.mark.gpu
@gpu_only
def test_gpu_torch_compile_inductor_matches_eager():
    cfg = make_config("sum", 96, **OPTIMIZERS["adam"])
    w, b = make_layer_params(80, 96, True, seed=80, device="cuda")
    x_pos, x_neg = make_batch(32, 80, seed=81, device="cuda")
    sw, sb = list(zero_states(w, cfg)), list(zero_states(b, cfg))

    got, expected = _compiled_step_matches_eager(cfg, (x_pos, x_neg, w, b, *sw, *sb), {})
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
