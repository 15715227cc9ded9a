"""The cpu backend's fused convolutional FF step (ops ff_conv_grad / ff_conv_step, csrc/ff_conv_cpu.cpp) against the
conv oracle (ffkernels.backends.reference_conv: autograd + torch.optim), with tolerance.py's rules: float64 within
1e-11, float32 against the float64 oracle fed the same rounded inputs and initial weights, k = 4 times the float32
oracle's own error plus rtol 1e-5; under autocast (bf16 convolutions) the bf16 oracle's rule (k = 4, rtol 2^-7).

Also: ff_conv_step == ff_conv_grad + ff_update bit for bit, the non-finite rule, opcheck, the argument checks (a bad
call raises, naming the problem, and changes nothing), the conv options' parser, the thread count.

The cuda backend's conv step runs the same comparisons on a GPU in test_conv_gpu.py, with the helpers here
(``run_steps(..., backend="cuda")``).
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import torch

from backends import BY_NAME, CPU, DTYPE_IDS, FP32, FP64, state_dtype
from ffkernels import FFConfig
from ffkernels._types import BackendUnavailableError, ConvGeometry
from ffkernels.backends import BACKENDS
from ffkernels.backends import compiled as _ext
from ffkernels.backends import reference_conv as oracle
from ffkernels.backends.contract import autocast_config
from ffkernels.config import OP_OPTION_KEYS
from options import OPTIMIZERS
from samples import ARGS, MUTATED
from tolerance import AUTOCAST, AUTOCAST_FP16, check, rule_for

pytestmark = [*CPU.marks, pytest.mark.usefixtures("one_thread")]
OPS = ("ff_conv_grad", "ff_conv_step")


class Case(NamedTuple):
    """One convolution: batch, input (C_in, H, W), C_out, kernel and nn.Conv2d's geometry."""
    B: int
    c_in: int
    H: int
    W: int
    c_out: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    @property
    def geom(self) -> ConvGeometry:
        return ConvGeometry(self.stride, self.padding, self.dilation, self.groups)

    @property
    def classes(self) -> int:
        """The competitive loss's class groups."""
        return 3 if self.c_out % 3 == 0 else 2


GEOMETRIES = {
    "7x9-k3": Case(5, 3, 7, 9, 6, (3, 3)),
    "b1-cin1-s2-p1": Case(1, 1, 7, 9, 6, (3, 3), (2, 2), (1, 1)),
    "k5-p1": Case(5, 3, 7, 9, 6, (5, 5), padding=(1, 1)),
    "k1": Case(5, 3, 7, 9, 4, (1, 1)),
    "d2": Case(5, 3, 7, 9, 6, (3, 3), dilation=(2, 2)),
    "groups2-p1": Case(5, 4, 7, 9, 6, (3, 3), padding=(1, 1), groups=2),
    "k5-whole-image": Case(1, 1, 5, 5, 6, (5, 5)),  # a 1x1 output
    "k3x2-s2x1-p1x0-d2x1-groups3": Case(5, 3, 9, 7, 6, (3, 2), (2, 1), (1, 0), (2, 1), 3),
    "s2-p1-d2-groups2": Case(5, 2, 7, 9, 4, (3, 3), (2, 2), (1, 1), (2, 2), 2),
    "b1-k1-s2": Case(1, 3, 7, 9, 6, (1, 1), (2, 2)),
}
# (loss, goodness_over): every loss with every goodness it has
LOSS_OVER = [("hinton", "sample"), ("hinton", "location"), ("symba", "sample"), ("symba", "location"),
             ("competitive", "group")]
# scff (hinton's terms with theta- on the negatives, plus lambda |g+|): its own smaller sweep in _option_cases
SCFF_OVER = [("scff", "sample"), ("scff", "location")]


# ---- the problem, the oracle and the comparison ---------------------------------------------------------------------

def _batch(gen, case: Case, competitive: bool):
    """float64 x_pos, x_neg (None for competitive), target (None unless competitive): pos and neg from different
    distributions, as trajectories.batch."""
    shape = (case.B, case.c_in, case.H, case.W)
    xp = torch.randn(shape, generator=gen, dtype=FP64) + 0.5
    if competitive:
        return xp, None, torch.randint(0, case.classes, (case.B,), generator=gen)
    return xp, 1.5 * torch.randn(shape, generator=gen, dtype=FP64), None


def _calibrated(cfg: FFConfig, case: Case, batch, weight, bias) -> FFConfig:
    """The threshold, symba's alpha and the temperature set from the goodness the initial weights give (float64), so
    that the loss is neither saturated nor flat and every gradient term matters; scff's theta- half a spread above
    theta+."""
    xp, xn, t = batch
    out = oracle.conv_objective(xp, xn, t, weight, bias, case.geom, cfg, case.classes)
    g = out.g_pos if out.g_neg is None else torch.cat([out.g_pos, out.g_neg])
    spread = g.std().item() if g.numel() > 1 else 1.0
    spread = spread if spread > 1e-6 else max(g.abs().mean().item(), 1.0)
    scff = dict(threshold_neg=g.mean().item() + 0.5 * spread) if cfg.loss == "scff" else {}
    return cfg.replace(threshold=g.mean().item(), symba_alpha=2.0 / spread, temperature=0.5 * spread, **scff)


class Params:
    """A weight, bias and their optimizer state (the tensors cfg.state_names names, zeros at first), in one dtype, on
    one device."""

    def __init__(self, weight, bias, cfg: FFConfig, dtype, device="cpu"):
        self.names = cfg.state_names
        self.weight = weight.to(device=device, dtype=dtype).clone()
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype).clone()
        sd = state_dtype(dtype)
        self.st_w = tuple(torch.zeros_like(self.weight, dtype=sd) for _ in self.names)
        self.st_b = () if bias is None else tuple(torch.zeros_like(self.bias, dtype=sd) for _ in self.names)

    def tensors(self) -> dict:
        """name -> tensor: weight, bias, every state tensor."""
        out = {"weight": self.weight, **({} if self.bias is None else {"bias": self.bias})}
        for pname, states in (("weight", self.st_w), ("bias", self.st_b)):
            out.update({f"{name} of {pname}": st for name, st in zip(self.names, states)})
        return out


def conv_loss_scale(exact, target, cfg: FFConfig) -> float:
    """tolerance.loss_scale for the conv loss: sum |dL/dg| |g| + |L| from the float64 oracle's goodness."""
    gs = [g.detach().double().requires_grad_(True) for g in (exact.g_pos, exact.g_neg) if g is not None]
    with torch.enable_grad():
        loss = oracle.conv_loss(gs[0], gs[1] if len(gs) > 1 else None, target, cfg)
        ds = torch.autograd.grad(loss, gs)
    return (sum((d * g).abs().sum() for d, g in zip(ds, gs)) + loss.abs()).item()


def on_cpu(out):
    """An FFStepOutput / FFGradOutput with its tensors on the CPU (None stays None)."""
    return type(out)(*(None if t is None else t.cpu() for t in out))


def check_conv_outputs(prefix, ours, same, exact, target, cfg, rule, dtype) -> None:
    """Every field of ``ours`` (CPU tensors of ``dtype``) against the float64 oracle ``exact``, the same-precision
    oracle ``same`` giving the precision's own error (tolerance.py)."""
    for field, a, r, t in zip(ours._fields, ours, same, exact):
        if t is None:
            assert a is None, f"{prefix}{field}: expected None, got a tensor"
            continue
        assert a.dtype == dtype, f"{prefix}{field}: dtype {a.dtype}"
        check(f"{prefix}{field}", a, r, t, rule, conv_loss_scale(exact, target, cfg) if field == "loss" else None)


def run_steps(dtype, case: Case, cfg: FFConfig, bias: bool, *, steps=3, seed=0, autocast=False, backend="cpu",
              rule=None):
    """``steps`` fused conv steps of ``backend`` ("cpu"; "cuda" on CUDA tensors; "triton" on its device, backends.py)
    against the oracle (in dtype, on the backend's device, and in float64 on the CPU from the same rounded inputs and
    initial weights), loss, h, g,
    weight, bias and every state tensor checked after every step with tolerance.py's rule for the device. ``autocast``:
    the steps run inside torch.autocast(bfloat16) with the options autocast_config gives them, the oracles with
    gemm_dtype=bfloat16 (float32 parameters); "float16" (or "bfloat16"): autocast with that dtype. ``rule``: another
    tolerance.py rule than the device's."""
    device = BY_NAME[backend].device
    gemm = ("bfloat16" if autocast is True else autocast) if autocast else None
    gen = torch.Generator().manual_seed(seed)
    competitive = cfg.loss == "competitive"
    fan_in = case.c_in // case.groups * case.kernel[0] * case.kernel[1]
    w0 = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=gen, dtype=FP64) * fan_in ** -0.5
    b0 = torch.randn(case.c_out, generator=gen, dtype=FP64) * fan_in ** -0.5 if bias else None
    w0, b0 = w0.to(dtype).double(), None if b0 is None else b0.to(dtype).double()  # the rounded initial weights
    batches = [_batch(gen, case, competitive) for _ in range(steps)]
    batches = [tuple(None if t is None else t.to(dtype).to(t.dtype) if t.is_floating_point() else t for t in bt)
               for bt in batches]
    cfg = _calibrated(cfg, case, batches[0], w0, b0)
    ref_cfg = cfg.replace(gemm_dtype=gemm) if gemm else cfg
    if rule is None:
        rule = {"bfloat16": AUTOCAST, "float16": AUTOCAST_FP16}[gemm] if gemm else rule_for(dtype, gpu=device == "cuda")
    ours, same, exact = (Params(w0, b0, cfg, dt, dev) for dt, dev in ((dtype, device), (dtype, device), (FP64, "cpu")))
    kernels = BACKENDS[backend]
    nc = case.classes if competitive else 0
    for step, (xp, xn, t) in enumerate(batches, start=1):
        low = [None if v is None else v.to(device=device, dtype=dtype) for v in (xp, xn)]
        t_dev = None if t is None else t.to(device)
        if gemm:
            with torch.autocast(device, dtype=getattr(torch, gemm)):
                run_cfg = autocast_config(cfg, ours.weight)
                assert run_cfg.gemm_dtype == gemm
                out = kernels.conv_step(*low, t_dev, ours.weight, ours.bias, ours.st_w, ours.st_b, step, case.geom, nc,
                                        run_cfg)
        else:
            out = kernels.conv_step(*low, t_dev, ours.weight, ours.bias, ours.st_w, ours.st_b, step, case.geom, nc,
                                    cfg)
        truth = oracle.conv_step(xp, xn, t, exact.weight, exact.bias, exact.st_w, exact.st_b, step, case.geom,
                                 ref_cfg, nc)
        if dtype == FP64:
            mine = truth  # the rule has k = 0: the same-precision oracle is the float64 one
        else:
            mine = oracle.conv_step(*low, t_dev, same.weight, same.bias, same.st_w, same.st_b, step, case.geom,
                                    ref_cfg, nc)
        check_conv_outputs(f"step {step} ", on_cpu(out), on_cpu(mine), truth, t, ref_cfg, rule, dtype)
        for name, a in ours.tensors().items():
            check(f"step {step} {name}", a.cpu(), (exact if dtype == FP64 else same).tensors()[name].cpu(),
                  exact.tensors()[name], rule)
    return ours


# ---- against the oracle ---------------------------------------------------------------------------------------------

def _option_cases():
    """Every (loss, goodness_over) x goodness x goodness_power x norm; the optimizer variant (options.OPTIMIZERS),
    the bias, the geometry and norm_eps rotate (every optimizer meets both bias settings). Then scff's reduced sweep."""
    cases = []
    optimizers, geoms = list(OPTIMIZERS), ["7x9-k3", "groups2-p1", "k3x2-s2x1-p1x0-d2x1-groups3"]
    grid = itertools.product(LOSS_OVER, ("sum", "mean"), (1, 2), ("rms", "l2", "none"))
    for j, ((loss, over), goodness, power, norm) in enumerate(grid):
        opt, bias, geom = optimizers[j % len(optimizers)], j % 2 == 0, geoms[j % len(geoms)]
        eps = 0.1 if j % 4 == 1 else 1e-8
        cid = f"{loss}-{over}-{goodness}-p{power}-{norm}-{opt}-{'bias' if bias else 'nobias'}-{geom}"
        cases.append((cid, dict(loss=loss, goodness_over=over, goodness=goodness, goodness_power=power, norm=norm,
                                norm_eps=eps, **OPTIMIZERS[opt]), bias, geom))
    # scff: every goodness_over x goodness x goodness_power once, the norm, penalty and the rest rotating
    for j, ((loss, over), goodness, power) in enumerate(itertools.product(SCFF_OVER, ("sum", "mean"), (1, 2))):
        norm, lam = ("rms", "l2", "none")[j % 3], (0.1, 0.5)[j % 2]
        opt, bias, geom = optimizers[j % len(optimizers)], j % 3 != 2, geoms[j % len(geoms)]
        cid = f"{loss}-{over}-{goodness}-p{power}-{norm}-l{lam:g}-{opt}-{'bias' if bias else 'nobias'}-{geom}"
        cases.append((cid, dict(loss=loss, goodness_over=over, goodness=goodness, goodness_power=power, norm=norm,
                                scff_lambda=lam, **OPTIMIZERS[opt]), bias, geom))
    return cases


def _dtype_params(cases):
    return [pytest.param(dt, *args, id=f"{DTYPE_IDS[dt]}-{cid}") for dt in (FP32, FP64) for cid, *args in cases]


@pytest.mark.parametrize("dtype,opts,bias,geom", _dtype_params(_option_cases()))
def test_every_option(dtype, opts, bias, geom):
    run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias)


# each geometry with each loss (goodness and optimizers vary)
SHAPE_CONFIGS = {
    "hinton-sample": (dict(loss="hinton", norm="rms", **OPTIMIZERS["adam"]), True),
    "symba-location-p1": (dict(loss="symba", goodness_over="location", goodness_power=1, goodness="mean", norm="l2",
                               **OPTIMIZERS["sgd-momentum"]), False),
    "competitive": (dict(loss="competitive", goodness_over="group", goodness="mean", norm="none",
                         **OPTIMIZERS["adam-wd"]), True),
}


@pytest.mark.parametrize("dtype,geom,config", _dtype_params(
    [(f"{g}-{c}", g, c) for g in GEOMETRIES for c in SHAPE_CONFIGS]))
def test_geometries(dtype, geom, config):
    opts, bias = SHAPE_CONFIGS[config]
    run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias)


# ---- mixed precision ------------------------------------------------------------------------------------------------

AUTOCAST_CASES = [(f"{loss}-{over}-p{p}-{opt}-{'bias' if bias else 'nobias'}-{geom}",
                   dict(loss=loss, goodness_over=over, goodness_power=p, **OPTIMIZERS[opt]), bias, geom)
                  for (loss, over), p, opt, bias, geom in [
                      (("hinton", "sample"), 2, "adam", True, "7x9-k3"),
                      (("hinton", "location"), 1, "sgd-momentum", False, "groups2-p1"),
                      (("symba", "sample"), 2, "sgd", True, "k3x2-s2x1-p1x0-d2x1-groups3"),
                      (("symba", "location"), 2, "adam-wd", True, "s2-p1-d2-groups2"),
                      (("competitive", "group"), 2, "adam", True, "7x9-k3"),
                      (("competitive", "group"), 1, "sgd-momentum-wd", False, "k5-p1")]]


@pytest.mark.parametrize("opts,bias,geom", [pytest.param(*a, id=cid) for cid, *a in AUTOCAST_CASES])
def test_autocast_bf16(opts, bias, geom):
    """Inside torch.autocast(bfloat16) on float32 parameters: bf16 convolutions, everything else float32, as the
    oracle with gemm_dtype=bfloat16; parameters and state stay float32."""
    ours = run_steps(FP32, GEOMETRIES[geom], FFConfig(**opts), bias, autocast=True)
    assert all(t.dtype == FP32 for t in ours.tensors().values())


def _fixed_problem(cfg: FFConfig, case=GEOMETRIES["groups2-p1"], bias=True, dtype=FP32, seed=3):
    gen = torch.Generator().manual_seed(seed)
    competitive = cfg.loss == "competitive"
    xp, xn, t = _batch(gen, case, competitive)
    w = torch.randn(case.c_out, case.c_in // case.groups, *case.kernel, generator=gen, dtype=FP64) * 0.3
    b = torch.randn(case.c_out, generator=gen, dtype=FP64) * 0.1 if bias else None
    cast = [None if v is None else v.to(dtype) for v in (xp, xn, w, b)]
    return case, cast[0], cast[1], t, cast[2], cast[3], case.classes if competitive else 0


def test_bf16_is_what_runs():
    """Under autocast the convolutions really are bf16: h differs from the float32 step's and equals the bf16
    oracle's to a bf16 rounding."""
    cfg = FFConfig()
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    cpu = BACKENDS["cpu"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cpu.conv_grad(xp, xn, t, w, b, case.geom, nc, autocast_config(cfg, w))
    full = cpu.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
    ref = oracle.conv_grad(xp, xn, t, w, b, case.geom, cfg.replace(gemm_dtype="bfloat16"), nc)
    scale = full.h_pos.abs().max().item()
    assert (low.h_pos - full.h_pos).abs().max().item() > 1e-4 * scale
    assert (low.h_pos - ref.h_pos).abs().max().item() <= 2 ** -8 * scale
    assert all(v.dtype == FP32 for v in low if v is not None)


@pytest.mark.parametrize("loss,over", LOSS_OVER[::2] + [LOSS_OVER[3]])
def test_outside_autocast_nothing_changes(loss, over):
    """Outside autocast the options keep gemm_dtype=param; an op whose options say param computes the same bits
    whether or not an autocast region encloses it (the autocast keys are excluded inside the ops); float64
    parameters are left alone by autocast."""
    cfg = FFConfig(loss=loss, goodness_over=over)
    for dtype in (FP32, FP64):
        case, xp, xn, t, w, b, nc = _fixed_problem(cfg, dtype=dtype)
        assert autocast_config(cfg, w) is cfg
        cpu = BACKENDS["cpu"]
        plain = cpu.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert autocast_config(cfg, w).gemm_dtype == ("bfloat16" if dtype == FP32 else "param")
            inside = cpu.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
        for field, a, c in zip(plain._fields, plain, inside):
            assert (a is None and c is None) or torch.equal(a, c), field


def test_float16_is_refused():
    cfg = FFConfig(gemm_dtype="float16")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    with pytest.raises(BackendUnavailableError, match="float16"):
        BACKENDS["cpu"].conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
    with pytest.raises(RuntimeError, match="no float16 GEMMs"):
        torch.ops.ffkernels.ff_conv_grad(xp, xn, t, w, b, *_geom_args(case), nc, cfg.conv_op_options)
    with pytest.raises(TypeError, match="float32 weights"):  # bf16 convolutions need float32 (master) weights
        torch.ops.ffkernels.ff_conv_grad(xp.double(), xn.double(), t, w.double(), b.double(), *_geom_args(case), nc,
                                         FFConfig(gemm_dtype="bfloat16").conv_op_options)


# ---- step == grad + update, the non-finite rule, threads ------------------------------------------------------------

def _geom_args(case: Case) -> list:
    g = case.geom
    return [list(g.stride), list(g.padding), list(g.dilation), g.groups]


def _linear_options(cfg: FFConfig) -> str:
    """The options of the linear ff_update with cfg's optimizer (it reads only the optimizer keys)."""
    return cfg.replace(loss="hinton", goodness_over="sample", goodness_power=2).op_options


def _state_slots(p: Params) -> list:
    return [*(list(p.st_w) + [None] * (2 - len(p.st_w))), *(list(p.st_b) + [None] * (2 - len(p.st_b)))]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("loss,over,opt", [("hinton", "sample", "adam-wd"), ("symba", "location", "sgd-momentum"),
                                           ("competitive", "group", "adam")])
def test_step_equals_grad_then_update(loss, over, opt, autocast):
    """ff_conv_step == ff_conv_grad, then the (linear) ff_update op with its loss, bit for bit, over two steps."""
    cfg = FFConfig(loss=loss, goodness_over=over, **OPTIMIZERS[opt])
    if autocast:
        cfg = cfg.replace(gemm_dtype="bfloat16")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    assert_step_is_grad_then_update(cfg, case, xp, xn, t, w, b, nc, "cpu")


def assert_step_is_grad_then_update(cfg, case, xp, xn, t, w, b, nc, device, namespace="ffkernels") -> None:
    """Two steps of ff_conv_step against ff_conv_grad + the (linear) ff_update op with its loss on a copy of the
    same parameters: every output, parameter and state tensor bitwise equal (test_conv_gpu.py runs it on CUDA,
    test_conv_triton.py on the ops of ``namespace`` ffkernels_triton)."""
    ops = getattr(torch.ops, namespace)
    fused, split = Params(w, b, cfg, FP32, device), Params(w, b, cfg, FP32, device)
    for step in (1, 2):
        out = ops.ff_conv_step(xp, xn, t, fused.weight, fused.bias, *_state_slots(fused), *_geom_args(case), nc, step,
                               cfg.conv_op_options)
        g = ops.ff_conv_grad(xp, xn, t, split.weight, split.bias, *_geom_args(case), nc, cfg.conv_op_options)
        assert g[5].dtype == FP32  # widened from a bf16 convolution's output
        # the linear op takes 2-D weights: the same memory viewed (C_out, C_in/groups * kH * kW)
        flat = [None if v is None else v.view(v.shape[0], -1) for v in _state_slots(split)[:2]]
        ops.ff_update(split.weight.view(w.shape[0], -1), split.bias, g[5].view(w.shape[0], -1), g[6], *flat,
                      *_state_slots(split)[2:], g[0], step, _linear_options(cfg))
        for a, c in zip(out, g[:5]):
            assert torch.equal(a, c)
        for name, a in fused.tensors().items():
            assert torch.equal(a, split.tensors()[name]), name


def assert_non_finite_step_changes_nothing(backend, how, cfg, case, xp, xn, t, w, b, nc, device, what=None) -> None:
    """After a finite first step of ``backend``'s conv_step, a NaN or inf in the input ("nan-input", "inf-input") or
    an inf weight ("inf-weight") gives a non-finite loss and leaves weight, bias and every state tensor bit for bit;
    conv_grad returns the non-finite loss (test_conv_gpu.py runs it on cuda, test_conv_triton.py on triton)."""
    be = BACKENDS[backend]
    p = Params(w, b, cfg, FP32, device)
    be.conv_step(xp, xn, t, p.weight, p.bias, p.st_w, p.st_b, 1, case.geom, nc, cfg)
    bad = xp.clone()
    if how == "inf-weight":
        p.weight[0, 0, 0, 0] = float("inf")
    else:
        bad[1, 0, 2, 3] = float("nan") if how == "nan-input" else float("inf")
    before = {k: v.clone() for k, v in p.tensors().items()}
    out = be.conv_step(bad, xn, t, p.weight, p.bias, p.st_w, p.st_b, 2, case.geom, nc, cfg)
    assert not torch.isfinite(out.loss).item()
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), (what, k)
    assert not torch.isfinite(be.conv_grad(bad, xn, t, p.weight, p.bias, case.geom, nc, cfg).loss).item()


def assert_two_runs_equal(backend, cfg, case, xp, xn, t, w, b, nc, dtype, device) -> None:
    """Two runs of two conv steps of ``backend`` from the same start give the same bits: outputs, weights and state
    (test_conv_gpu.py runs it on cuda, test_conv_triton.py on triton)."""
    runs = []
    for _ in range(2):
        p = Params(w, b, cfg, dtype, device)
        outs = [BACKENDS[backend].conv_step(xp, xn, t, p.weight, p.bias, p.st_w, p.st_b, step, case.geom, nc, cfg)
                for step in (1, 2)]
        runs.append(([v for o in outs for v in o if v is not None], p.tensors()))
    for a, c in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, c)
    for name, a in runs[0][1].items():
        assert torch.equal(a, runs[1][1][name]), name


@pytest.mark.parametrize("loss,over", LOSS_OVER)
@pytest.mark.parametrize("how", ["nan-input", "inf-input"])
def test_non_finite_loss_changes_nothing(loss, over, how):
    """A NaN (or inf) in the input: the loss is not finite, weight, bias and every state tensor stay bit for bit
    (after a finite first step, so the state is not zero); ff_conv_grad returns the loss and raises nothing."""
    cfg = FFConfig(loss=loss, goodness_over=over, optimizer="sgd", momentum=0.9, lr=0.1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    p = Params(w, b, cfg, FP32)
    cpu = BACKENDS["cpu"]
    cpu.conv_step(xp, xn, t, p.weight, p.bias, p.st_w, p.st_b, 1, case.geom, nc, cfg)
    before = {k: v.clone() for k, v in p.tensors().items()}
    bad = xp.clone()
    bad[1, 0, 2, 3] = float("nan") if how == "nan-input" else float("inf")
    out = cpu.conv_step(bad, xn, t, p.weight, p.bias, p.st_w, p.st_b, 2, case.geom, nc, cfg)
    assert not torch.isfinite(out.loss)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k
    assert not torch.isfinite(cpu.conv_grad(bad, xn, t, p.weight, p.bias, case.geom, nc, cfg).loss)


def test_thread_count_does_not_change_loss_and_goodness():
    """The epilogue's sums have a fixed order: the loss, h and g are the same bits on 1 and 2 threads."""
    cfg = FFConfig(loss="symba", goodness_over="location")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, Case(16, 3, 14, 14, 8, (3, 3), padding=(1, 1)))
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(BACKENDS["cpu"].conv_grad(xp, xn, t, w, b, case.geom, nc, cfg))
    finally:
        torch.set_num_threads(old)
    for field in ("loss", "h_pos", "h_neg", "g_pos", "g_neg"):
        assert torch.equal(getattr(outs[0], field), getattr(outs[1], field)), field


# ---- the ops: opcheck, schemas, shapes ------------------------------------------------------------------------------

def _op_samples():
    """(id, op, args): every loss and goodness, with and without bias, every state-slot pattern, strided inputs,
    an int32 target, bf16 convolutions."""
    out = []
    specs = [("hinton-sample-adam-bias", dict(), True, "7x9-k3", False),
             ("symba-location-sgd-momentum-nobias-strided", dict(loss="symba", goodness_over="location",
                                                                 optimizer="sgd", momentum=0.9), False,
              "s2-p1-d2-groups2", True),
             ("competitive-group-sgd-bias-int32", dict(loss="competitive", goodness_over="group", optimizer="sgd"),
              True, "groups2-p1", False),
             ("hinton-location-p1-bf16", dict(goodness_over="location", goodness_power=1, gemm_dtype="bfloat16"),
              True, "k3x2-s2x1-p1x0-d2x1-groups3", False)]
    for sid, opts, bias, geom, strided in specs:
        cfg = FFConfig(**opts)
        case, xp, xn, t, w, b, nc = _fixed_problem(cfg, GEOMETRIES[geom], bias)
        if strided:
            xp = xp.transpose(2, 3).contiguous().transpose(2, 3)
        if t is not None and "int32" in sid:
            t = t.int()
        p = Params(w, b, cfg, FP32)
        p.st_w = tuple(s + 0.01 for s in p.st_w)
        p.st_b = tuple(s + 0.01 for s in p.st_b)
        geo = _geom_args(case)
        out.append((sid, "ff_conv_grad", [xp, xn, t, p.weight, p.bias, *geo, nc, cfg.conv_op_options]))
        out.append((sid, "ff_conv_step", [xp, xn, t, p.weight, p.bias, *_state_slots(p), *geo, nc, 2,
                                          cfg.conv_op_options]))
    return out


@pytest.mark.parametrize("op,args", [pytest.param(op, a, id=f"{op}-{sid}") for sid, op, a in _op_samples()])
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.ffkernels, op).default, args)


@pytest.mark.parametrize("op,args", [pytest.param(op, a, id=f"{op}-{sid}") for sid, op, a in _op_samples()])
def test_outputs_match_the_fakes(op, args):
    """The real outputs have the fakes' shapes and dtypes (g: (B,), (B, H_out, W_out) or (B, num_classes); h_neg and
    g_neg empty without negatives; grad_bias empty without bias)."""
    real = getattr(torch.ops.ffkernels, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = getattr(torch.ops.ffkernels, op)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args])
    assert [(tuple(r.shape), r.dtype) for r in real] == [(tuple(f.shape), f.dtype) for f in fake]


def test_schemas_follow_the_samples():
    for op in OPS:
        args = getattr(torch.ops.ffkernels, op).default._schema.arguments
        assert [a.name for a in args] == list(ARGS[op]), op
        written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
        assert written == list(MUTATED[op]), op


def test_conv_ops_on_the_cpu_and_cuda_backends():
    """cpu and cuda have the conv step (cuda's kernels registered for the CUDA key in a CUDA build); so has triton (its
    own ops, test_conv_triton.py)."""
    for name in ("cpu", "cuda", "triton"):
        assert hasattr(BACKENDS[name], "conv_step") and hasattr(BACKENDS[name], "conv_grad"), name
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in OPS:
        assert has(f"ffkernels::{op}", "CPU"), op
        assert has(f"ffkernels::{op}", "CUDA") == _ext.built_with_cuda(), op


# ---- bad input: an exception naming the problem, nothing changed -----------------------------------------------------

def _bad(name, change, exc, match, cfg=None):
    return pytest.param(change, exc, match, cfg, id=name)


BAD = [
    _bad("x-3d", lambda a: a.update(x_pos=a["x_pos"][0]), ValueError, "must be 4-D"),
    _bad("channel-mismatch", lambda a: a.update(x_pos=a["x_pos"][:, :1], x_neg=a["x_neg"][:, :1]), ValueError,
         "channels but the layer takes in_channels=4"),
    _bad("kernel-larger-than-padded-input", lambda a: a.update(x_pos=a["x_pos"][:, :, :2, :1],
                                                               x_neg=a["x_neg"][:, :, :2, :1], padding=(0, 1)),
         ValueError, "larger than the padded input"),
    _bad("pos-neg-shapes", lambda a: a.update(x_neg=a["x_neg"][:-1]), ValueError, "same shape"),
    _bad("dtype-mismatch", lambda a: a.update(x_neg=a["x_neg"].double()), TypeError, "dtype"),
    _bad("weight-2d", lambda a: a.update(weight=a["weight"].flatten(1)), ValueError, "4-D"),
    _bad("groups-not-dividing", lambda a: a.update(groups=4), ValueError, "groups=4"),
    _bad("bias-shape", lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias"),
    _bad("empty-batch", lambda a: a.update(x_pos=a["x_pos"][:0], x_neg=a["x_neg"][:0]), ValueError, "empty"),
    _bad("target-with-hinton", lambda a: a.update(target=torch.zeros(5, dtype=torch.long)), ValueError,
         "not target labels"),
    _bad("peer-norm", lambda a: None, ValueError, "peer normalization", FFConfig(peer_norm=0.1)),
    _bad("target-out-of-range", lambda a: a["target"].__setitem__(1, 3), ValueError, r"\[0, 3\)", "competitive"),
    _bad("negative-target", lambda a: a["target"].__setitem__(0, -1), ValueError, r"\[0, 3\)", "competitive"),
    _bad("float-target", lambda a: a.update(target=a["target"].double()), TypeError, "integer", "competitive"),
    _bad("target-shape", lambda a: a.update(target=a["target"][:-1]), ValueError, "one label per image",
         "competitive"),
    _bad("x-neg-with-competitive", lambda a: a.update(x_neg=a["x_pos"].clone()), ValueError, "no negatives",
         "competitive"),
    _bad("missing-target", lambda a: a.update(target=None), (ValueError, TypeError), "target", "competitive"),
    _bad("classes-not-dividing", lambda a: a.update(num_classes=4), ValueError, "num_classes=4", "competitive"),
    _bad("one-class", lambda a: a.update(num_classes=1), ValueError, "num_classes", "competitive"),
]


def _bad_call_args(cfg, device="cpu"):
    """(cfg, case, params, the call's arguments by name) of a good call on ``device`` that a BAD change spoils."""
    competitive = cfg is not None and not isinstance(cfg, FFConfig)
    cfg = FFConfig(loss="competitive", goodness_over="group") if competitive else (cfg or FFConfig())
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t = (None if v is None else v.to(device) for v in (xp, xn, t))
    p = Params(w, b, cfg, FP32, device)
    p.st_w = tuple(s + 0.01 for s in p.st_w)
    a = dict(x_pos=xp, x_neg=xn, target=t, weight=p.weight, bias=p.bias, padding=case.padding, groups=case.groups,
             num_classes=nc)
    return cfg, case, p, a


@pytest.mark.parametrize("via", ["backend", "op"])
@pytest.mark.parametrize("change,exc,match,cfg", BAD)
def test_bad_input_raises_and_changes_nothing(change, exc, match, cfg, via):
    """Through the backend (the shared Python checks, contract_conv.py) and through the op itself (its C++ checks):
    the same problems, a message naming each, and weight, bias and state untouched."""
    cfg, case, p, a = _bad_call_args(cfg)
    change(a)
    before = {k: v.clone() for k, v in p.tensors().items()}
    g = case.geom._replace(padding=a["padding"], groups=a["groups"])
    with pytest.raises(exc, match=match):
        if via == "backend":
            BACKENDS["cpu"].conv_step(a["x_pos"], a["x_neg"], a["target"], a["weight"], a["bias"], p.st_w, p.st_b, 1,
                                      g, a["num_classes"], cfg)
        else:
            torch.ops.ffkernels.ff_conv_step(a["x_pos"], a["x_neg"], a["target"], a["weight"], a["bias"],
                                             *_state_slots(p), list(g.stride), list(g.padding), list(g.dilation),
                                             g.groups, a["num_classes"], 1, cfg.conv_op_options)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


def test_bad_state_changes_nothing():
    cfg, case, p, a = _bad_call_args(None)
    before = {k: v.clone() for k, v in p.tensors().items()}
    slots = _state_slots(p)
    slots[3] = None  # adam's exp_avg_sq of the bias
    with pytest.raises(ValueError, match="exp_avg_sq"):
        torch.ops.ffkernels.ff_conv_step(a["x_pos"], a["x_neg"], None, p.weight, p.bias, *slots, *_geom_args(case), 0,
                                         1, cfg.conv_op_options)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


# ---- the options strings --------------------------------------------------------------------------------------------

def _conv_call(options: str, namespace="ffkernels", device="cpu"):
    cfg, case, p, a = _bad_call_args(None, device)
    return getattr(torch.ops, namespace).ff_conv_grad(a["x_pos"], a["x_neg"], None, p.weight, p.bias,
                                                      *_geom_args(case), 0, options)


def _with(options: str, key: str, value: str) -> str:
    return ";".join(f"{key}={value}" if item.split("=")[0] == key else item for item in options.split(";"))


GOOD = FFConfig().conv_op_options


OPTION_ERRORS = [  # (options, the ValueError's message): also the Triton conv ops' (test_conv_triton.py)
    pytest.param(GOOD + ";colour=red", "unknown option 'colour'", id="unknown"),
    pytest.param(GOOD + ";temperature=2.0", "'temperature' is given twice", id="duplicate"),
    pytest.param(GOOD.rsplit(";", 1)[0], "lack temperature", id="missing"),
    pytest.param(FFConfig().op_options, "lack goodness_over, goodness_power, temperature", id="linear-string"),
    pytest.param(_with(GOOD, "goodness_power", "3"), "goodness_power must be 1 or 2", id="power-3"),
    pytest.param(_with(GOOD, "goodness_power", "1.5"), "goodness_power must be 1 or 2", id="power-1.5"),
    pytest.param(_with(GOOD, "temperature", "0.0"), "temperature must be a finite number > 0", id="temperature-0"),
    pytest.param(_with(GOOD, "temperature", "inf"), "temperature", id="temperature-inf"),
    pytest.param(_with(GOOD, "goodness_over", "pixel"), "unknown goodness_over 'pixel'", id="over-unknown"),
    pytest.param(_with(GOOD, "goodness_over", "group"), "goodness_over='group'", id="group-without-competitive"),
    pytest.param(_with(GOOD, "loss", "competitive"), "loss='competitive' goes with", id="competitive-per-sample"),
    pytest.param(_with(GOOD, "lr", "-1.0"), "lr must be", id="lr-negative"),
]


@pytest.mark.parametrize("options,match", OPTION_ERRORS)
def test_conv_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        _conv_call(options)


def test_conv_options_parse_every_written_value():
    """goodness_power as Python writes it (an int), and as a float: both parse."""
    for power in ("1", "2", "2.0"):
        _conv_call(_with(GOOD, "goodness_power", power))


def test_linear_ops_keep_refusing_conv_options():
    """The linear ops' parser knows none of the conv keys and refuses the competitive loss (whose config cannot make
    a linear options string: FFConfig.op_options raises)."""
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown option 'goodness_over'"):
        torch.ops.ffkernels.ff_grad(x, x, w, None, None, GOOD)
    competitive = FFConfig(loss="competitive", goodness_over="group")
    with pytest.raises(ValueError, match="conv ops"):
        competitive.op_options
    linear_keys = competitive._options(OP_OPTION_KEYS)
    with pytest.raises(ValueError, match="loss='competitive' needs the conv ops"):
        torch.ops.ffkernels.ff_grad(x, x, w, None, None, linear_keys)
