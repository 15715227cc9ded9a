"""The triton backend's fused convolutional FF step (ops ffkernels_triton::ff_conv_grad / ff_conv_step, the kernels
conv_*.py of ffkernels/backends/triton) against the conv oracle, with test_conv_cpu.py's helpers and sweeps
(``run_steps(..., backend="triton")``: the same options, geometries, three steps, everything checked after every step)
and tolerance.py's rules: under the interpreter (CPU tensors, float32) FP32_TRITON_CONV, k = 6 times the float32
oracle's own error plus rtol 1e-5 (the C++ kernels' k = 4 but for one chaotic case of the shared sweep, see
tolerance.py); on a GPU the GPU rule (k = 4, rtol 1e-4; float16/bfloat16 k = 2, rtol = eps).

Also: several N-, K- and M-tiles (``settings.force_conv_tiles``: a class group's goodness partials in two N-tiles,
conv groups with a class group across them, the K loop), the split over the rows (``force_row_splits``),
ff_conv_step == ff_conv_grad + ff_update bit for bit, two runs bitwise equal, the non-finite rule, labels out of range
(ValueError for CPU tensors; on a GPU a NaN loss without a host sync), the argument and option checks of the compiled
ops, opcheck and the fakes, the layers on backend="triton", and (GPU) one host sync per FFNet step. Under
torch.autocast(bfloat16) (bf16 convolutions, float32 parameters): test_conv_cpu.py's autocast cases against the bf16
oracle (tolerance.AUTOCAST), with several tiles and the row split too, step == grad + update, the bf16 op samples'
opcheck; float16 refused.

Under the interpreter: ``TRITON_INTERPRET=1 python -m pytest -q -m triton tests/test_conv_triton.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backends import BY_NAME, DTYPE_IDS, FP32, TRITON
from ffkernels import FFConfig, FFConv2d, FFLinear, FFNet
from ffkernels._types import BackendUnavailableError
from ffkernels.backends import BACKENDS, resolve_backend
from ffkernels.backends import reference_conv as oracle
from ffkernels.backends.contract import autocast_config
from options import OPTIMIZERS
from test_conv_cpu import (AUTOCAST_CASES, BAD, GEOMETRIES, LOSS_OVER, OPTION_ERRORS, SHAPE_CONFIGS, Case, Params,
                           _bad_call_args,
                           _conv_call, _fixed_problem, _geom_args, _op_samples, _option_cases, _state_slots,
                           assert_non_finite_step_changes_nothing, assert_step_is_grad_then_update,
                           assert_two_runs_equal, run_steps)
from test_host_syncs import syncs_of
from tolerance import FP32_TRITON_CONV, lowp

pytestmark = [*TRITON.marks, pytest.mark.usefixtures("one_thread", "exact_cudnn")]
DEVICE = TRITON.device
NS = "ffkernels_triton"


@pytest.fixture
def exact_cudnn():
    """On a GPU the same-precision oracle convolves with cuDNN: without TF32 and deterministic (the fp32 rule assumes
    IEEE products); nothing to do on the CPU."""
    if not TRITON.gpu:
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield


def _ops():
    return TRITON.ops  # registers torch.ops.ffkernels_triton (conv ops included)


def _params(cases, dtypes=(FP32,)):
    """(dtype, *args) parameters with ids triton-<dtype>-<case> (what gpu_selection.py reads)."""
    return [pytest.param(dt, *args, id=f"triton-{DTYPE_IDS[dt]}-{cid}") for dt in dtypes for cid, *args in cases]


def _on(*tensors) -> list:
    return [None if v is None else v.to(DEVICE) for v in tensors]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(module, before):
    for k, v in module.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


# ---- against the oracle (test_conv_cpu.py's sweeps) -----------------------------------------------------------------

def _steps(dtype, case, cfg, bias):
    """run_steps on the triton backend; float32 under the interpreter with tolerance.py's FP32_TRITON_CONV (k = 6: one
    chaotic case of the shared sweep, see there), the device's rule otherwise."""
    rule = FP32_TRITON_CONV if dtype == FP32 and not TRITON.gpu else None
    return run_steps(dtype, case, cfg, bias, backend="triton", rule=rule)


@pytest.mark.parametrize("dtype,opts,bias,geom", _params(_option_cases()))
def test_every_option(dtype, opts, bias, geom):
    """Every (loss, goodness_over) x goodness x goodness_power x norm; optimizers, bias, geometries and norm_eps
    rotating; three steps, everything checked after every step."""
    _steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias)


@pytest.mark.parametrize("dtype,geom,config", _params([(f"{g}-{c}", g, c) for g in GEOMETRIES for c in SHAPE_CONFIGS]))
def test_geometries(dtype, geom, config):
    """Odd H/W, stride, padding, dilation, groups, 1x1 and 5x5 kernels, a 1x1 output, C_in 1, batch 1; each loss."""
    opts, bias = SHAPE_CONFIGS[config]
    _steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias)


# Shapes with more channels and features than one 16-wide tile (force_conv_tiles(16)): several N-tiles, K steps and
# M-tiles. Competitive with 42 channels in 3 classes of 14: class 1 has channels in two N-tiles (its partials in slot
# 1 of tile 0 and slot 0 of tile 1); with 2 conv groups of 21 channels class 1 also spans both groups.
TILED = {
    "competitive-c42-k3": (Case(3, 3, 6, 7, 42, (3, 3)), dict(loss="competitive", goodness_over="group",
                                                             goodness="mean", norm="rms", **OPTIMIZERS["adam"]), True),
    "competitive-c42-groups2-p1-p1": (Case(2, 6, 5, 6, 42, (3, 3), padding=(1, 1), groups=2),
                                      dict(loss="competitive", goodness_over="group", goodness_power=1, goodness="sum",
                                           norm="l2", **OPTIMIZERS["sgd-momentum"]), False),
    "hinton-location-cin5-c20-s2-p1": (Case(3, 5, 9, 8, 20, (3, 3), (2, 2), (1, 1)),
                                       dict(loss="hinton", goodness_over="location", norm="rms",
                                            **OPTIMIZERS["adam-wd"]), True),
    "scff-location-cin5-c20-s2": (Case(3, 5, 9, 8, 20, (3, 3), (2, 2), (1, 1)),
                                  dict(loss="scff", goodness_over="location", norm="rms", threshold=0.5,
                                       threshold_neg=1.5, scff_lambda=0.3, **OPTIMIZERS["adam"]), True),
    "symba-sample-groups3-d2-p1": (Case(2, 9, 8, 9, 39, (3, 2), (1, 2), (2, 1), (2, 1), 3),
                                   dict(loss="symba", goodness_over="sample", goodness_power=1, norm="none",
                                        **OPTIMIZERS["sgd-momentum-wd"]), True),
}


@pytest.mark.parametrize("dtype,name", _params([(n, n) for n in TILED]))
@pytest.mark.parametrize("splits", [1, 3], ids=["nosplit", "split3"])
def test_several_tiles(dtype, name, splits):
    """The tiled paths of the GPU configs on small shapes: 16-wide tiles everywhere, and with ``split3`` kernel C3's
    split over the rows (fp32 partials added in split order by kernel 3b)."""
    from ffkernels.backends.triton import settings

    case, opts, bias = TILED[name]
    with settings.force_conv_tiles(16), settings.force_row_splits(splits):
        _steps(dtype, case, FFConfig(**opts), bias)


# ---- mixed precision: torch.autocast(bfloat16) on float32 parameters ------------------------------------------------

@pytest.mark.parametrize("opts,bias,geom", [pytest.param(*a, id=cid) for cid, *a in AUTOCAST_CASES])
def test_autocast_bf16(opts, bias, geom):
    """test_conv_cpu.py's autocast cases: bf16 convolutions (kernel C0b's x̂, W cast once, z and dW rounded to bf16),
    everything else float32, against the oracle with gemm_dtype=bfloat16 (tolerance.AUTOCAST); parameters and state
    stay float32."""
    ours = run_steps(FP32, GEOMETRIES[geom], FFConfig(**opts), bias, autocast=True, backend="triton")
    assert all(t.dtype == FP32 for t in ours.tensors().values())


@pytest.mark.parametrize("name", ["competitive-c42-groups2-p1-p1", "hinton-location-cin5-c20-s2-p1",
                                  "symba-sample-groups3-d2-p1"])
def test_autocast_several_tiles_and_split(name):
    """Under autocast with 16-wide tiles everywhere and kernel C3 split in three over the rows (kernel 3b rounds the
    sum of the fp32 partials to bf16 once)."""
    from ffkernels.backends.triton import settings

    case, opts, bias = TILED[name]
    with settings.force_conv_tiles(16), settings.force_row_splits(3):
        run_steps(FP32, case, FFConfig(**opts), bias, autocast=True, backend="triton")


def test_autocast_bf16_is_what_runs():
    """Under autocast the convolutions really are bf16: h differs from the float32 step's and equals the bf16
    oracle's to a bf16 rounding; every output float32."""
    cfg = FFConfig()
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    tri = BACKENDS["triton"]
    with torch.autocast(TRITON.device, dtype=torch.bfloat16):
        low = tri.conv_grad(*_on(xp, xn), t, *_on(w, b), case.geom, nc, autocast_config(cfg, w))
    full = tri.conv_grad(*_on(xp, xn), t, *_on(w, b), case.geom, nc, cfg)
    ref = oracle.conv_grad(xp, xn, t, w, b, case.geom, cfg.replace(gemm_dtype="bfloat16"), nc)
    scale = full.h_pos.abs().max().item()
    assert (low.h_pos - full.h_pos).abs().max().item() > 1e-4 * scale
    assert (low.h_pos.cpu() - ref.h_pos).abs().max().item() <= 2 ** -8 * scale
    assert all(v.dtype == FP32 for v in low if v is not None)
    assert torch.equal(low.grad_weight, low.grad_weight.to(torch.bfloat16).float())


# float16/bfloat16 (GPU only): SGD, whose update is linear in the gradient, as test_conv_gpu.py's LOWP_CASES
LOWP_CASES = [(f"{loss}-{over}-p{p}-{opt}-{'bias' if bias else 'nobias'}-{geom}",
               dict(loss=loss, goodness_over=over, goodness_power=p, goodness=good, **OPTIMIZERS[opt]), bias, geom)
              for (loss, over), p, good, opt, bias, geom in [
                  (("hinton", "sample"), 2, "mean", "sgd", True, "7x9-k3"),
                  (("symba", "location"), 1, "sum", "sgd-momentum", False, "s2-p1-d2-groups2"),
                  (("competitive", "group"), 2, "mean", "sgd-momentum", True, "k3x2-s2x1-p1x0-d2x1-groups3")]]


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON.gpu, reason="float16/bfloat16: the interpreter runs float32 only")
@pytest.mark.parametrize("dtype,opts,bias,geom", _params(LOWP_CASES, (torch.float16, torch.bfloat16)))
def test_lowp_steps(dtype, opts, bias, geom):
    """float16/bfloat16 parameters (fp32 state): three steps within k = 2 of the same-precision oracle's error + eps."""
    ours = run_steps(dtype, GEOMETRIES[geom], FFConfig(**opts), bias, backend="triton")
    assert ours.weight.dtype == dtype and all(s.dtype == FP32 for s in ours.st_w + ours.st_b)
    assert lowp(dtype).k == 2


# ---- the op's own guarantees ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
@pytest.mark.parametrize("splits", [1, 2], ids=["nosplit", "split2"])
@pytest.mark.parametrize("loss,over,opt", [("hinton", "sample", "adam-wd"), ("symba", "location", "sgd-momentum"),
                                           ("competitive", "group", "adam")])
def test_step_equals_grad_then_update(loss, over, opt, splits, autocast):
    """ff_conv_step == ff_conv_grad, then the (linear) Triton ff_update op with its loss, bit for bit, over two
    steps: kernel C3 rounds the gradient to the dtype (under autocast to bf16, widened) and applies the update
    kernel's optimizer code (and 3b the same with a split)."""
    from ffkernels.backends.triton import settings

    _ops()
    cfg = FFConfig(loss=loss, goodness_over=over, **OPTIMIZERS[opt])
    if autocast:
        cfg = cfg.replace(gemm_dtype="bfloat16")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    with settings.force_row_splits(splits):  # 5 images x 63 pixels: three 128-row blocks
        assert_step_is_grad_then_update(cfg, case, *_on(xp, xn, t, w, b), nc, DEVICE, namespace=NS)


DETERMINISM = [("hinton-sample-p2-7x9-k3", dict(), "7x9-k3"),
               ("competitive-group-k3x2-s2x1-p1x0-d2x1-groups3",
                dict(loss="competitive", goodness_over="group", goodness="mean"), "k3x2-s2x1-p1x0-d2x1-groups3")]


@pytest.mark.parametrize("opts,geom", [pytest.param(o, g, id=i) for i, o, g in DETERMINISM])
def test_two_runs_are_bitwise_equal(opts, geom):
    """Two runs of two steps from the same start: the same bits (fixed reduction orders, no atomics)."""
    cfg = FFConfig(**opts)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg, GEOMETRIES[geom])
    xp, xn, t, w, b = _on(xp, xn, t, w, b)
    assert_two_runs_equal("triton", cfg, case, xp, xn, t, w, b, nc, FP32, DEVICE)


@pytest.mark.parametrize("loss,over", LOSS_OVER)
@pytest.mark.parametrize("how", ["nan-input", "inf-input", "inf-weight"])
def test_non_finite_loss_changes_nothing(loss, over, how):
    """A NaN or inf in the input, or an inf weight: the loss is not finite, weight, bias and every state tensor stay
    bit for bit (after a finite first step, so the state is not zero), decided on the device by kernel C3 (and 3b:
    the second half runs with a split); ff_conv_grad returns the loss and raises nothing."""
    from ffkernels.backends.triton import settings

    cfg = FFConfig(loss=loss, goodness_over=over, optimizer="sgd", momentum=0.9, lr=0.1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, xn, t, w, b = _on(xp, xn, t, w, b)
    for splits in (1, 2):
        with settings.force_row_splits(splits):
            assert_non_finite_step_changes_nothing("triton", how, cfg, case, xp, xn, t, w, b, nc, DEVICE, splits)


def _competitive_op_call(label):
    cfg = FFConfig(loss="competitive", goodness_over="group", optimizer="sgd", momentum=0.9, lr=0.1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    xp, t, w, b = _on(xp, t, w, b)
    p = Params(w, b, cfg, FP32, DEVICE)
    op = _ops().ff_conv_step
    op(xp, None, t, p.weight, p.bias, *_state_slots(p), *_geom_args(case), nc, 1, cfg.conv_op_options)
    bad = t.clone()
    bad[1] = label(nc)
    args = (xp, None, bad, p.weight, p.bias, *_state_slots(p), *_geom_args(case), nc, 2, cfg.conv_op_options)
    grad_args = (xp, None, bad, p.weight, p.bias, *_geom_args(case), nc, cfg.conv_op_options)
    return p, op, args, grad_args


@pytest.mark.skipif(TRITON.gpu, reason="CPU tensors (the interpreter): the labels are read on the host")
@pytest.mark.parametrize("label", [lambda nc: nc, lambda nc: -1], ids=["num_classes", "minus1"])
def test_out_of_range_labels_raise_for_cpu_tensors(label):
    """For CPU tensors the op reads the labels' range on the host, as the CPU op: ValueError, nothing changed."""
    p, op, args, grad_args = _competitive_op_call(label)
    before = {k: v.clone() for k, v in p.tensors().items()}
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\)"):
        op(*args)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        _ops().ff_conv_grad(*grad_args)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON.gpu, reason="needs a GPU: CPU tensors' labels are read on the host")
@pytest.mark.parametrize("label", [lambda nc: nc, lambda nc: -1], ids=["num_classes", "minus1"])
def test_out_of_range_labels_give_a_nan_loss_without_a_host_sync(label):
    """On a GPU the op does not read the labels (a sync at every step): it clamps them for its kernels and makes the
    loss NaN, so nothing is updated (the layers raise, below)."""
    p, op, args, grad_args = _competitive_op_call(label)
    before = {k: v.clone() for k, v in p.tensors().items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = op(*args)[0]
        grad_loss = _ops().ff_conv_grad(*grad_args)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(loss).item() and torch.isnan(grad_loss).item()
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


# ---- the layers on backend="triton" ---------------------------------------------------------------------------------

def _cnn(backend="triton", device=DEVICE, seed=0, **extra):
    torch.manual_seed(seed)
    opts = dict(loss="competitive", num_classes=2, backend=backend, device=device, temperature=0.5, lr=1e-3,
                goodness="mean", **extra)
    return FFNet(modules=[FFConv2d(1, 4, 3, padding=1, **opts), nn.MaxPool2d(2),
                          FFConv2d(4, 6, 3, padding=1, groups=2, **opts), nn.AvgPool2d(2), nn.Flatten(),
                          FFLinear(6 * 2 * 2, 4, **opts)])


def test_resolve_backend_takes_triton_for_the_conv_step():
    assert resolve_backend("triton", DEVICE, FP32, kernels="conv_step") == "triton"
    assert FFConv2d(3, 4, 3, backend="triton", device=DEVICE).backend == "triton"
    if TRITON.gpu and BY_NAME["cuda"].skip_reason is not None:  # no CUDA kernels built: triton is auto's choice
        assert resolve_backend("auto", "cuda", FP32, kernels="conv_step") == "triton"


def test_a_conv_net_matches_the_reference_backend():
    """FFNet.ff_step_competitive over conv, pooling and FFLinear competitive layers, backend triton against the
    reference backend on the same start (SGD: no rounding noise amplified), three steps."""
    nets = [_cnn("triton", DEVICE, optimizer="sgd", momentum=0.9), _cnn("reference", "cpu", optimizer="sgd",
                                                                         momentum=0.9)]
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.rand(3, 1, 9, 8, generator=g)
        y = torch.tensor([0, 1, 1])
        outs = [net.ff_step_competitive(x.to(d), y.to(d)) for net, d in zip(nets, (DEVICE, "cpu"))]
        torch.testing.assert_close(outs[0].losses.cpu(), outs[1].losses, rtol=1e-5, atol=1e-6)
    ours, ref = (net.state_dict() for net in nets)
    for k, v in ref.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(ours[k].cpu(), v, rtol=1e-5, atol=1e-6, msg=k)


def test_out_of_range_labels_raise_from_the_layer_and_the_net_changing_nothing():
    """FFConv2d.ff_step_competitive and FFNet.ff_step_competitive read the labels' flag with the loss and raise
    ValueError; nothing was updated."""
    net = _cnn()
    layer = net.layers[0]
    x = torch.rand(3, 1, 9, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    net.ff_step_competitive(x, torch.tensor([0, 1, 1], device=DEVICE))  # a good step: non-zero optimizer state
    before, counts = _snapshot(net), [m.step_count for m in net.layers]
    for call in (lambda: layer.ff_step_competitive(x, torch.tensor([0, 2, 1], device=DEVICE)),
                 lambda: net.ff_step_competitive(x, torch.tensor([0, -1, 1], device=DEVICE))):
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            call()
        _unchanged(net, before)
        assert [m.step_count for m in net.layers] == counts


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON.gpu, reason="the interpreter reads its arguments on the host itself")
def test_a_conv_net_step_syncs_once():
    """One host sync per FFNet.ff_step_competitive on the GPU (the labels' flag and every loss read together)."""
    net = _cnn()
    x = torch.rand(3, 1, 9, 8, device="cuda")
    y = torch.tensor([0, 1, 1], device="cuda")
    net.ff_step_competitive(x, y)
    n, calls = syncs_of(lambda: net.ff_step_competitive(x, y))
    assert n == 1, calls


def test_fflinear_competitive_is_the_1x1_convolution():
    """FFLinear's competitive step runs the conv op on (N, K, 1, 1): bit for bit FFConv2d's 1x1 step."""
    torch.manual_seed(1)
    kw = dict(loss="competitive", num_classes=4, temperature=0.3, backend="triton", device=DEVICE)
    lin = FFLinear(6, 8, goodness="mean", lr=1e-3, **kw)
    conv = FFConv2d(6, 8, 1, **kw)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(8, 6, 1, 1))
        conv.bias.copy_(lin.bias)
    for _ in range(3):
        x = torch.rand(5, 6, device=DEVICE)
        y = torch.tensor([0, 3, 1, 2, 3], device=DEVICE)
        a = lin.ff_step_competitive(x, y)
        c = conv.ff_step_competitive(x.view(5, 6, 1, 1), y)
        assert torch.equal(a.loss, c.loss) and torch.equal(a.g_pos, c.g_pos)
        assert torch.equal(lin.weight, conv.weight.view(8, 6)) and torch.equal(lin.bias, conv.bias)


def test_float16_autocast_is_refused():
    """No float16 convolutions for float32 weights: a step under a float16 autocast raises (the backend's check, and
    the op's), rather than running in fp32; nothing changes; bf16 ones need float32 weights; a bfloat16 autocast
    runs."""
    layer = FFConv2d(3, 4, 3, backend="triton", device=DEVICE)
    x = torch.rand(2, 3, 7, 7, device=DEVICE)
    before = _snapshot(layer)
    with torch.autocast(TRITON.device, dtype=torch.float16):
        with pytest.raises(BackendUnavailableError, match="float16"):
            layer.ff_step(x, x.flip(0))
    _unchanged(layer, before)
    cfg = FFConfig(gemm_dtype="float16")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    with pytest.raises(NotImplementedError, match="no float16 GEMMs"):
        _ops().ff_conv_grad(*_on(xp, xn), t, *_on(w, b), *_geom_args(case), nc, cfg.conv_op_options)
    with pytest.raises(TypeError, match="float32 weights"):
        _ops().ff_conv_grad(*_on(xp.double(), xn.double()), t, *_on(w.double(), b.double()), *_geom_args(case), nc,
                            FFConfig(gemm_dtype="bfloat16").conv_op_options)
    with torch.autocast(TRITON.device, dtype=torch.bfloat16):
        layer.ff_step(x, x.flip(0))
    assert layer.step_count == 1 and layer.weight.dtype == FP32


# ---- the ops: opcheck, the fakes, argument and option checks --------------------------------------------------------

def _triton_op_samples():
    """test_conv_cpu.py's op samples (CPU tensors, moved to the backend's device), bf16 convolutions included."""
    return [pytest.param(op, args, id=f"triton-{op}-{sid}") for sid, op, args in _op_samples()]


def _device_args(args) -> list:
    return [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op,args", _triton_op_samples())
def test_opcheck(op, args):
    torch.library.opcheck(getattr(_ops(), op).default, _device_args(args))


@pytest.mark.parametrize("op,args", _triton_op_samples())
def test_outputs_match_the_fakes(op, args):
    """The real outputs have the fakes' shapes, dtypes and devices (g by goodness_over; h_neg and g_neg empty without
    negatives; grad_bias empty without bias)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _device_args(args)
    real = getattr(_ops(), op)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = getattr(_ops(), op)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert [(tuple(r.shape), r.dtype, r.device) for r in real] == [(tuple(f.shape), f.dtype, f.device) for f in fake]


@pytest.mark.parametrize("compiler", ["aot_eager"] + (["inductor"] if TRITON.gpu else []))
def test_compiled_step_matches_eager(compiler):
    """torch.compile(fullgraph=True) of a conv step through the op: it traces (fakes, declared mutations) and gives
    the eager results, the in-place update included (an opaque custom_op under the interpreter, a triton_op whose
    launches inductor schedules on a GPU)."""
    sid, op, args = next(a for a in _op_samples() if a[1] == "ff_conv_step" and "competitive" in a[0])
    op = getattr(_ops(), op).default

    def train(*a):
        out = op(*a)
        return out[0] * 2.0, out[1].sum(-1)

    eager, compiled = (_device_args([a.clone() if isinstance(a, torch.Tensor) else a for a in args]) for _ in range(2))
    expected = train(*eager)
    got = torch.compile(train, fullgraph=True, backend=compiler)(*compiled)
    assert not torch.equal(compiled[3], _device_args(args)[3]), "the in-place update did not happen"
    for a, e in zip(list(got) + compiled, list(expected) + eager):
        if isinstance(a, torch.Tensor):
            if compiler == "aot_eager":
                assert torch.equal(a, e)
            else:
                torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def _bad_cases():
    """test_conv_cpu.py's BAD cases; on a GPU the op does not read the labels (a NaN loss instead: tested above)."""
    return [c for c in BAD if not (TRITON.gpu and c.id in ("target-out-of-range", "negative-target"))]


@pytest.mark.parametrize("via", ["backend", "op"])
@pytest.mark.parametrize("change,exc,match,cfg", _bad_cases())
def test_bad_input_raises_and_changes_nothing(change, exc, match, cfg, via):
    """The compiled ops' problems and messages, through the backend (contract_conv.py) and through the op itself;
    weight, bias and state untouched."""
    cfg, case, p, a = _bad_call_args(cfg, DEVICE)
    change(a)
    before = {k: v.clone() for k, v in p.tensors().items()}
    g = case.geom._replace(padding=a["padding"], groups=a["groups"])
    with pytest.raises(exc, match=match):
        if via == "backend":
            BACKENDS["triton"].conv_step(a["x_pos"], a["x_neg"], a["target"], a["weight"], a["bias"], p.st_w, p.st_b,
                                         1, g, a["num_classes"], cfg)
        else:
            _ops().ff_conv_step(a["x_pos"], a["x_neg"], a["target"], a["weight"], a["bias"], *_state_slots(p),
                                list(g.stride), list(g.padding), list(g.dilation), g.groups, a["num_classes"], 1,
                                cfg.conv_op_options)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("what", ["missing-state", "float64", "missing-x_neg", "step-0"])
def test_bad_op_arguments_change_nothing(what):
    """The op's own checks: a missing optimizer state, a dtype it does not run, no negatives for hinton, step 0."""
    cfg, case, p, a = _bad_call_args(None, DEVICE)
    before = {k: v.clone() for k, v in p.tensors().items()}
    slots, xn, weight, bias, step = _state_slots(p), a["x_neg"], p.weight, p.bias, 1
    exc, match = ValueError, None
    if what == "missing-state":
        slots[3], match = None, "exp_avg_sq"  # adam's exp_avg_sq of the bias
    elif what == "float64":
        a["x_pos"], xn, weight, bias = a["x_pos"].double(), xn.double(), weight.double(), bias.double()
        exc, match = TypeError, "float32"
    elif what == "missing-x_neg":
        xn, match = None, "needs x_neg"
    else:
        step, match = 0, "step must be >= 1"
    with pytest.raises(exc, match=match):
        _ops().ff_conv_step(a["x_pos"], xn, None, weight, bias, *slots, *_geom_args(case), 0, step,
                            cfg.conv_op_options)
    for k, v in p.tensors().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("options,match", OPTION_ERRORS)
def test_conv_options_are_checked(options, match):
    """The conv options string as the C++ parser checks it (the linear ops' string lacks the conv keys)."""
    _ops()
    with pytest.raises(ValueError, match=match):
        _conv_call(options, NS, DEVICE)


def test_the_backend_refuses_float16_autocast_before_the_op():
    cfg = FFConfig(gemm_dtype="float16")
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    with pytest.raises(BackendUnavailableError, match="float16"):
        BACKENDS["triton"].conv_grad(*_on(xp, xn), t, *_on(w, b), case.geom, nc, cfg)


def test_grad_returns_the_gradient_in_the_weights_shape():
    """ff_conv_grad's dW and db: shapes and dtype of the weight and bias, and against the oracle's."""
    cfg = FFConfig(loss="symba", goodness_over="location", goodness_power=1)
    case, xp, xn, t, w, b, nc = _fixed_problem(cfg)
    out = BACKENDS["triton"].conv_grad(*_on(xp, xn), t, *_on(w, b), case.geom, nc, cfg)
    ref = oracle.conv_grad(xp.double(), xn.double(), t, w.double(), b.double(), case.geom, cfg, nc)
    assert out.grad_weight.shape == w.shape and out.grad_bias.shape == b.shape
    for ours, exact in ((out.grad_weight, ref.grad_weight), (out.grad_bias, ref.grad_bias)):
        assert ours.dtype == FP32
        assert (ours.cpu().double() - exact).abs().max() <= 1e-5 * exact.abs().max()
