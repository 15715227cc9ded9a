"""The cuda backend's fused convolutional FF step (ops ff_conv_grad / ff_conv_step, csrc/cuda/ff_conv_cuda.cu) on a
GPU: test_conv_cpu.py's comparisons with the conv oracle (its helpers: ``run_steps(..., backend="cuda")``, the same
options, geometries and three steps), with tolerance.py's GPU rules (float64 1e-11; float32 k = 4, rtol 1e-4;
float16/bfloat16 k = 2, rtol = eps against the same-precision oracle on the GPU). Also: ff_conv_step == ff_conv_grad +
ff_update bit for bit, two runs bitwise equal, the non-finite rule, out-of-range labels (a NaN loss and nothing
changed at the op, without a host sync; ValueError from the layer), one host sync per FFNet competitive step, opcheck,
"auto" picking cuda; under torch.autocast (bf16 and fp16 convolutions on float32 parameters) test_conv_cpu.py's
autocast cases against the oracle with that gemm_dtype, step == grad + update, the convolutions really in bf16/fp16,
float64 left alone. Skipped without a GPU and a CUDA build.

cuDNN runs the convolutions with torch's settings, like nn.Conv2d: TF32 for float32 and a weight gradient that need not
be deterministic, unless torch says otherwise. The tests say otherwise (the ``exact_cudnn`` fixture:
torch.backends.cudnn deterministic, no TF32), as the fp32 rule and the bitwise checks need; the epilogue kernels are
deterministic whatever the settings.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backends import CUDA_BACKEND, DTYPE_IDS, FP32, FP64
from ffkernels import FFConfig, FFConv2d, FFLinear, FFNet, NonFiniteLossError
from ffkernels.backends import BACKENDS, resolve_backend
from ffkernels.backends import reference_conv as oracle
from options import OPTIMIZERS
from ffkernels.backends.contract import autocast_config
from test_conv_cpu import (AUTOCAST_CASES, GEOMETRIES, LOSS_OVER, SHAPE_CONFIGS, Params, _fixed_problem, _geom_args,
                           assert_non_finite_step_changes_nothing, assert_step_is_grad_then_update,
                           assert_two_runs_equal,
                           _op_samples, _option_cases, _state_slots, check_conv_outputs, on_cpu, run_steps)
from test_host_syncs import syncs_of
from tolerance import FP64 as FP64_RULE
from tolerance import check, lowp

pytestmark = [*CUDA_BACKEND.marks, pytest.mark.usefixtures("exact_cudnn")]
LOWP = (torch.float16, torch.bfloat16)


@pytest.fixture
def exact_cudnn():
    """cuDNN without TF32 (the float32 rule assumes IEEE products, as for the GEMMs) and with deterministic
    algorithms (the bitwise checks); torch's own switches, restored after the test."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield


def _params(cases, dtypes=(FP32, FP64)):
    """(dtype, *args) parameters with the ids gpu_selection.py reads: cuda-<dtype>-<case>."""
    return [pytest.param(dt, *args, id=f"cuda-{DTYPE_IDS[dt]}-{cid}") for dt in dtypes for cid, *args in cases]


def _on_gpu(*tensors) -> list:
    return [None if v is None else v.cuda() for v in tensors]


# ---- against the oracle (test_conv_cpu.py's sweeps) -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,opts,bias,geom", _params(_option_cases()))
def test_every_option(dtype, opts, bias, geom):
    """Every (loss, goodness_over) x goodness x goodness_power x norm, the optimizers, bias and geometries rotating;
    three steps, everything checked after every step."""
    run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias, backend="cuda")


@pytest.mark.parametrize("dtype,geom,config", _params([(f"{g}-{c}", g, c) for g in GEOMETRIES for c in SHAPE_CONFIGS]))
def test_geometries(dtype, geom, config):
    """Odd H/W, stride, padding, dilation, groups, 1x1 and 5x5 kernels, a 1x1 output, C_in 1, batch 1; each loss."""
    opts, bias = SHAPE_CONFIGS[config]
    run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias, backend="cuda")


# float16/bfloat16: SGD, whose update is linear in the gradient, so errors compare step after step (Adam's first steps
# are ~lr * sign(grad), which turns the rounding of near-zero gradient entries into full steps), as test_cuda_gpu.py
LOWP_CASES = [(f"{loss}-{over}-p{p}-{opt}-{'bias' if bias else 'nobias'}-{geom}",
               dict(loss=loss, goodness_over=over, goodness_power=p, goodness=good, **OPTIMIZERS[opt]), bias, geom)
              for (loss, over), p, good, opt, bias, geom in [
                  (("hinton", "sample"), 2, "mean", "sgd", True, "7x9-k3"),
                  (("hinton", "location"), 1, "sum", "sgd-momentum", False, "groups2-p1"),
                  (("symba", "sample"), 1, "sum", "sgd-momentum-wd", True, "k3x2-s2x1-p1x0-d2x1-groups3"),
                  (("symba", "location"), 2, "mean", "sgd", True, "s2-p1-d2-groups2"),
                  (("competitive", "group"), 2, "mean", "sgd-momentum", True, "k5-p1"),
                  (("competitive", "group"), 1, "sum", "sgd", False, "b1-cin1-s2-p1")]]


@pytest.mark.parametrize("dtype,opts,bias,geom", _params(LOWP_CASES, LOWP))
def test_lowp_steps(dtype, opts, bias, geom):
    """float16/bfloat16 parameters (fp32 optimizer state): three steps within k = 2 of the same-precision oracle's own
    error (on the GPU, cuDNN's half convolutions) plus eps."""
    ours = run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias, backend="cuda")
    assert ours.weight.dtype == dtype and all(s.dtype == FP32 for s in ours.st_w + ours.st_b)


@pytest.mark.parametrize("dtype", LOWP, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("loss,over", LOSS_OVER)
@pytest.mark.parametrize("power", [1, 2], ids=["p1", "p2"])
def test_lowp_grad(dtype, loss, over, power):
    """ff_conv_grad in float16/bfloat16: every output, the gradient included, against the same-precision oracle's own
    error (k = 2) plus eps."""
    cfg = FFConfig(loss=loss, goodness_over=over, goodness_power=power, goodness="mean", temperature=0.5)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, dtype=FP64)
    exact = oracle.conv_grad(*[None if v is None else v.to(dtype).double() for v in (xp, xn)], t,
                             w.to(dtype).double(), b.to(dtype).double(), case.geom, cfg, nc)
    xp, xn, t, w, b = [v if v is None or not v.is_floating_point() else v.to(dtype)
                       for v in _on_gpu(xp, xn, t, w, b)]
    ours = BACKENDS["cuda"].conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
    same = oracle.conv_grad(xp, xn, t, w, b, case.geom, cfg, nc)
    check_conv_outputs("", on_cpu(ours), on_cpu(same), exact, t.cpu() if t is not None else None, cfg, lowp(dtype),
                       dtype)


# ---- the op's own guarantees --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm", ["param", "bfloat16", "float16"], ids=["fp32", "autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("loss,over,opt", [("hinton", "sample", "adam-wd"), ("symba", "location", "sgd-momentum"),
                                           ("competitive", "group", "adam")])
def test_step_equals_grad_then_update(loss, over, opt, gemm):
    """ff_conv_step == ff_conv_grad, then the (linear) ff_update op with its loss, bit for bit, over two steps (under
    autocast too: the update reads the same bf16/fp16 dW, which ff_conv_grad returns widened)."""
    cfg = FFConfig(loss=loss, goodness_over=over, gemm_dtype=gemm, **OPTIMIZERS[opt])
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
    assert_step_is_grad_then_update(cfg, case, xp, xn, t, w, b, nc, "cuda")


DETERMINISM = [("hinton-sample-p2-7x9-k3", dict(), "7x9-k3"),
               ("symba-location-p1-groups2-p1", dict(loss="symba", goodness_over="location", goodness_power=1),
                "groups2-p1"),
               ("competitive-group-k3x2-s2x1-p1x0-d2x1-groups3",
                dict(loss="competitive", goodness_over="group", goodness="mean"), "k3x2-s2x1-p1x0-d2x1-groups3")]


@pytest.mark.parametrize("dtype", [FP32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("opts,geom", [pytest.param(o, g, id=i) for i, o, g in DETERMINISM])
@pytest.mark.parametrize("batch", [5, 300])
def test_two_runs_are_bitwise_equal(dtype, opts, geom, batch):
    """Two runs of two steps from the same start give the same bits: outputs, weights and state (the epilogue's
    reductions have fixed orders; cuDNN's weight gradient is deterministic under the fixture's switch)."""
    cfg = FFConfig(**opts)
    case = GEOMETRIES[geom]._replace(B=batch)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, case)
    xp, xn, t, w, b = [v if v is None or not v.is_floating_point() else v.to(dtype)
                       for v in _on_gpu(xp, xn, t, w, b)]
    assert_two_runs_equal("cuda", cfg, case, xp, xn, t, w, b, nc, dtype, "cuda")


@pytest.mark.parametrize("loss,over", LOSS_OVER)
@pytest.mark.parametrize("how", ["nan-input", "inf-input", "inf-weight"])
def test_non_finite_loss_changes_nothing(loss, over, how):
    """A NaN or inf in the input, or an inf weight: the loss is not finite, weight, bias and every state tensor stay
    bit for bit (after a finite first step, so the state is not zero), decided on the device; ff_conv_grad returns the
    loss and raises nothing."""
    cfg = FFConfig(loss=loss, goodness_over=over, optimizer="sgd", momentum=0.9, lr=0.1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
    assert_non_finite_step_changes_nothing("cuda", how, cfg, case, xp, xn, t, w, b, nc, "cuda")


def test_out_of_range_labels_give_a_nan_loss_without_a_host_sync():
    """The op does not read the labels on a GPU (a sync at every step): it clamps them for its kernels and makes the
    loss NaN, so nothing is updated (the layers raise, below)."""
    cfg = FFConfig(loss="competitive", goodness_over="group", optimizer="sgd", momentum=0.9, lr=0.1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
    p = Params(w, b, cfg, FP32, "cuda")
    op = torch.ops.ffkernels.ff_conv_step
    op(xp, None, t, p.weight, p.bias, *_state_slots(p), *_geom_args(case), nc, 1, cfg.conv_op_options)
    before = {k: v.clone() for k, v in p.tensors().items()}
    for bad_label in (nc, -1):
        bad = t.clone()
        bad[1] = bad_label
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the op must not read the labels on the host
        try:
            loss = op(xp, None, bad, p.weight, p.bias, *_state_slots(p), *_geom_args(case), nc, 2,
                      cfg.conv_op_options)[0]
            grad_loss = torch.ops.ffkernels.ff_conv_grad(xp, None, bad, p.weight, p.bias, *_geom_args(case), nc,
                                                         cfg.conv_op_options)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isnan(loss).item() and torch.isnan(grad_loss).item()
        for k, v in p.tensors().items():
            assert torch.equal(v, before[k]), k


def _cnn(dtype=FP32, seed=0):
    torch.manual_seed(seed)
    opts = dict(loss="competitive", num_classes=2, backend="cuda", device="cuda", dtype=dtype, temperature=0.5,
                lr=1e-3, goodness="mean")
    return FFNet(modules=[FFConv2d(1, 4, 3, padding=1, **opts), nn.MaxPool2d(2),
                          FFConv2d(4, 6, 3, padding=1, groups=2, **opts), nn.AvgPool2d(2), nn.Flatten(),
                          FFLinear(6 * 2 * 2, 4, **opts)])


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(module, before):
    for k, v in module.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


def test_out_of_range_labels_raise_from_the_layer_and_the_net_changing_nothing():
    """FFConv2d.ff_step_competitive and FFNet.ff_step_competitive read the labels' flag with the loss in their one sync
    and raise ValueError; nothing was updated (the loss was NaN on the device)."""
    net = _cnn()
    layer = net.layers[0]
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 9, 8, generator=g).cuda()
    y = torch.tensor([0, 1, 1], device="cuda")
    net.ff_step_competitive(x, y)  # one good step: non-zero optimizer state
    before, counts = _snapshot(net), [m.step_count for m in net.layers]
    for call in (lambda: layer.ff_step_competitive(x, torch.tensor([0, 2, 1], device="cuda")),
                 lambda: layer.ff_step_competitive(x, torch.tensor([0, -1, 1], device="cuda")),
                 lambda: net.ff_step_competitive(x, torch.tensor([0, 2, 1], device="cuda"))):
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            call()
        _unchanged(net, before)
        assert [m.step_count for m in net.layers] == counts


def test_a_conv_net_step_syncs_once():
    """One host sync per FFNet.ff_step_competitive on CUDA, whatever the depth (the labels' flag and every layer's loss
    read together), counted at the Python level and by torch.cuda's sync debug mode."""
    net = _cnn()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 9, 8, generator=g).cuda()
    y = torch.tensor([0, 1, 1], device="cuda")
    net.ff_step_competitive(x, y)  # cuDNN's and the allocator's first-call work out of the way
    n, calls = syncs_of(lambda: net.ff_step_competitive(x, y))
    assert n == 1, calls
    counts = {m.step_count for m in net.layers}
    assert len(counts) == 1 and counts.pop() >= 2  # every step finite (syncs_of steps once or twice)


def test_a_non_finite_layer_stops_the_sweep():
    net = _cnn()
    x = torch.rand(3, 1, 9, 8, device="cuda")
    y = torch.tensor([0, 1, 1], device="cuda")
    with torch.no_grad():
        net.layers[1].weight[0, 0, 0, 0] = float("inf")
    before = _snapshot(net)
    with pytest.raises(NonFiniteLossError, match="layer 1"):
        net.ff_step_competitive(x, y)
    assert [m.step_count for m in net.layers] == [1, 0, 0]
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor) and not k.startswith("layers.0."):
            assert torch.equal(v, before[k]), k


def test_fflinear_competitive_is_the_1x1_convolution():
    torch.manual_seed(1)
    kw = dict(loss="competitive", num_classes=4, temperature=0.3, backend="cuda", device="cuda")
    lin = FFLinear(6, 8, goodness="mean", lr=1e-3, **kw)
    conv = FFConv2d(6, 8, 1, **kw)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(8, 6, 1, 1))
        conv.bias.copy_(lin.bias)
    for _ in range(3):
        x = torch.rand(5, 6, device="cuda")
        y = torch.tensor([0, 3, 1, 2, 3], device="cuda")
        a = lin.ff_step_competitive(x, y)
        c = conv.ff_step_competitive(x.view(5, 6, 1, 1), y)
        assert torch.equal(a.loss, c.loss) and torch.equal(a.g_pos, c.g_pos)
        assert torch.equal(lin.weight, conv.weight.view(8, 6)) and torch.equal(lin.bias, conv.bias)


# ---- the ops: opcheck, the fakes, choosing the backend, autocast ----------------------------------------------------

def _cuda_op_samples():
    """test_conv_cpu.py's op samples (CPU tensors: moved to the GPU by the test), bf16 convolutions included."""
    return [pytest.param(op, args, id=f"cuda-{op}-{sid}") for sid, op, args in _op_samples()]


def _cuda_args(args) -> list:
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op,args", _cuda_op_samples())
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.ffkernels, op).default, _cuda_args(args))


@pytest.mark.parametrize("op,args", _cuda_op_samples())
def test_outputs_match_the_fakes(op, args):
    args = _cuda_args(args)
    real = getattr(torch.ops.ffkernels, op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = getattr(torch.ops.ffkernels, op)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args])
    assert [(tuple(r.shape), r.dtype, r.device) for r in real] == [(tuple(f.shape), f.dtype, f.device) for f in fake]


def test_auto_picks_cuda_for_the_conv_step():
    for dtype in (FP32, FP64, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", "cuda", dtype, kernels="conv_step") == "cuda"
    assert FFConv2d(3, 4, 3, device="cuda").backend == "cuda"
    assert FFLinear(6, 8, loss="competitive", num_classes=4, device="cuda").backend == "cuda"


# ---- torch.autocast: bf16 and fp16 convolutions on float32 parameters --------------------------------------------

@pytest.mark.parametrize("opts,bias,geom", [pytest.param(*a, id=f"cuda-autocast-bf16-{cid}")
                                            for cid, *a in AUTOCAST_CASES])
def test_autocast_bf16(opts, bias, geom):
    """test_conv_cpu.py's autocast cases on cuda: bf16 convolutions (cuDNN), everything else float32, as the oracle with
    gemm_dtype=bfloat16 on the GPU; parameters and state stay float32."""
    ours = run_steps(FP32, GEOMETRIES[geom], FFConfig(**opts), bias, autocast="bfloat16", backend="cuda")
    assert all(t.dtype == FP32 for t in ours.tensors().values())


@pytest.mark.parametrize("opts,bias,geom", [pytest.param(*a, id=f"cuda-autocast-fp16-{cid}")
                                            for cid, *a in AUTOCAST_CASES[::2]])
def test_autocast_fp16(opts, bias, geom):
    """The same under autocast(dtype=float16): fp16 convolutions, against the oracle with gemm_dtype=float16."""
    ours = run_steps(FP32, GEOMETRIES[geom], FFConfig(**opts), bias, autocast="float16", backend="cuda")
    assert all(t.dtype == FP32 for t in ours.tensors().values())


@pytest.mark.parametrize("gemm", ["bfloat16", "float16"], ids=["bf16", "fp16"])
def test_low_precision_is_what_runs(gemm):
    """Under autocast the convolutions really are bf16 (fp16): h differs from the float32 step's and equals the oracle's
    with that gemm_dtype (cuDNN's convolution of the same operands) to half a rounding of the dtype."""
    low_dtype = getattr(torch, gemm)
    cfg = FFConfig()
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
    cuda = BACKENDS["cuda"]
    with torch.autocast("cuda", dtype=low_dtype):
        run_cfg = autocast_config(cfg, w)
        assert run_cfg.gemm_dtype == gemm
        low = cuda.conv_grad(xp, xn, t, w, b, case.geom, nc, run_cfg)
    full = cuda.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
    ref = oracle.conv_grad(xp, xn, t, w, b, case.geom, cfg.replace(gemm_dtype=gemm), nc)
    eps = torch.finfo(low_dtype).eps
    scale = full.h_pos.abs().max().item()
    assert (low.h_pos - full.h_pos).abs().max().item() > eps / 64 * scale
    assert (low.h_pos - ref.h_pos).abs().max().item() <= eps / 2 * scale
    assert all(v.dtype == FP32 for v in low if v is not None)


def test_outside_autocast_and_float64_nothing_changes():
    """Options with gemm_dtype=param compute the same bits inside an autocast region (the ops exclude its keys);
    float64 parameters are left alone by autocast; the op refuses bf16 convolutions for float64 weights."""
    cfg = FFConfig(loss="symba", goodness_over="location")
    for dtype in (FP32, FP64):
        case, xp, xn, t, w, b, nc = _fixed_problem(cfg, dtype=dtype)
        xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
        assert autocast_config(cfg, w) is cfg
        cuda = BACKENDS["cuda"]
        plain = cuda.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert autocast_config(cfg, w).gemm_dtype == ("bfloat16" if dtype == FP32 else "param")
            inside = cuda.conv_grad(xp, xn, t, w, b, case.geom, nc, cfg)
        for field, a, c in zip(plain._fields, plain, inside):
            assert (a is None and c is None) or torch.equal(a, c), field
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, dtype=FP64)
    xp, xn, t, w, b = _on_gpu(xp, xn, t, w, b)
    with pytest.raises(TypeError, match="float32 weights"):
        torch.ops.ffkernels.ff_conv_grad(xp, xn, t, w, b, *_geom_args(case), nc,
                                         cfg.replace(gemm_dtype="bfloat16").conv_op_options)


def test_a_layer_steps_under_autocast():
    """FFConv2d.ff_step under autocast on cuda: runs (bf16 convolutions), parameters and state stay float32."""
    layer = FFConv2d(3, 4, 3, backend="cuda", device="cuda")
    x = torch.rand(2, 3, 7, 7, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer.ff_step(x, x.flip(0))
    assert layer.step_count == 1 and torch.isfinite(out.loss) and out.loss.dtype == FP32
    assert all(t.dtype == FP32 for t in layer.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def test_grad_matches_the_oracle_once_with_float64():
    """A float64 gradient on larger images (the goodness kernels' block reductions over several warps, the dz warps
    over several lane strides) to 1e-11."""
    cfg = FFConfig(loss="symba", goodness_over="sample", goodness_power=2)
    case = GEOMETRIES["groups2-p1"]._replace(B=6, H=21, W=19)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, case, dtype=FP64)
    exact = oracle.conv_grad(xp, xn, t, w, b, case.geom, cfg, nc)
    ours = BACKENDS["cuda"].conv_grad(*_on_gpu(xp, xn, t, w, b), case.geom, nc, cfg)
    for field, a, e in zip(ours._fields, on_cpu(ours), exact):
        if e is not None:
            check(field, a, e, e, FP64_RULE)
