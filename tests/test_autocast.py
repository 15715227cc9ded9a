"""Mixed precision: FF steps inside torch.autocast(dtype=torch.bfloat16) (docs/design.md, "Mixed precision").

The oracle is the reference with ``FFConfig(gemm_dtype="bfloat16")``: x̂ and W cast to bf16, their GEMM in bf16
(fp32 accumulation, bf16 output, as autocast's mm), the epilogue and the optimizer in the parameters' dtype; by
autograd, dL/dz rounded to bf16 for the dW GEMM, whose output is rounded to bf16 and widened. R64 is that oracle in
float64 (the same bf16 roundings, everything else in float64), R the same in float32; every backend with bf16 GEMMs
runs under torch.autocast on float32 layers, on its device, and is checked after every step with tolerance.AUTOCAST.
The kernels with float16 GEMMs too (cuda) run a part of the same tests under autocast(dtype=torch.float16) against
the oracle with gemm_dtype=float16 (tolerance.AUTOCAST_FP16). A backend without a GEMM dtype (its ``gemm_dtypes``)
refuses it, whichever backends those are.
"""
import pytest
import torch

import oracle
from backends import ALL, CPU, CUDA_BACKEND, TRITON, TRITON_PACKAGE, backend_params
from ffkernels import FFConfig, FFLinear, FFNet, NonFiniteLossError, embed_label, wrong_labels
from ffkernels.backends import BACKENDS
from ffkernels.backends.contract import autocast_config, check_gemm_dtype
from ffkernels._types import BackendUnavailableError
from options import option_cases, peer_options
from samples import sample_ids, sample_inputs
from tolerance import AUTOCAST, AUTOCAST_FP16, AUTOCAST_PAIR, check, check_outputs
from trajectories import batch, state_pairs

BF16 = torch.bfloat16
LOW_GEMMS = ("bfloat16", "float16")
# the backends with bf16 GEMMs under autocast, as the tests run them (backends.py): float32 layers on their device
AUTOCAST_BACKENDS = tuple(b for b in ALL if "bfloat16" in BACKENDS[b.name].gemm_dtypes)
# the kernels (not the reference, whose math is the oracle's) with fp16 GEMMs under autocast
FP16_BACKENDS = tuple(b for b in ALL if b.namespace and "float16" in BACKENDS[b.name].gemm_dtypes)
# the backends with registered ops (cpu, cuda, triton) and bf16 GEMMs: the tests of their ops under autocast
AUTOCAST_OPS = tuple(b for b in AUTOCAST_BACKENDS if b.namespace)
# the compiled (C++/CUDA) ones among them
COMPILED_AUTOCAST = tuple(b for b in (CPU, CUDA_BACKEND) if b in AUTOCAST_BACKENDS)
# (backend, GEMM dtype) pairs a backend does not run: refused, whichever backends those are
REFUSED = tuple((b, g) for b in ALL for g in LOW_GEMMS if g not in BACKENDS[b.name].gemm_dtypes)
RULES = {"bfloat16": AUTOCAST, "float16": AUTOCAST_FP16}


def autocast(device="cpu", gemm="bfloat16"):
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, gemm))


def _gemm_params(backends) -> list:
    """(backend, gemm dtype) for every lower-precision GEMM dtype each backend runs."""
    return [pytest.param(b, g, id=f"{b.name}-{g}", marks=b.marks) for b in backends for g in LOW_GEMMS
            if g in BACKENDS[b.name].gemm_dtypes]


def _oracles(layer: FFLinear, exact: bool = False, gemm: str = "bfloat16"):
    """R (float32) and R64 (float64) oracles with the layer's weights and gemm_dtype=gemm; ``exact``: R64 without
    the low-precision roundings (the math itself, for comparisons whose roundings differ by design)."""
    cfg = layer.config.replace(gemm_dtype=gemm)
    r = layer.peer_mean if layer.config.peer_norm > 0 else None
    ref = oracle.FFLayerRef(layer.weight, layer.bias, cfg, peer_mean=r)
    ref64 = oracle.FFLayerRef(layer.weight.double(), None if layer.bias is None else layer.bias.double(),
                              layer.config if exact else cfg, peer_mean=None if r is None else r.double())
    return ref, ref64


def run_autocast(backend, B, K, N, *, steps=3, bias=True, seed=0, labeled_classes=None, rule=None, exact=False,
                 gemm="bfloat16", **cfg):
    """``steps`` FFLinear steps under autocast (dtype ``gemm``) on ``backend``, on its device, against the oracle with
    the same GEMM dtype, everything checked after every step (outputs, parameters, optimizer state, peer_mean); the
    parameters and state stay float32."""
    dev = backend.device
    rule = rule or RULES[gemm]
    torch.manual_seed(seed)
    layer = FFLinear(K, N, bias=bias, backend=backend.name, device=dev, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    if layer.config.peer_norm > 0:
        with torch.no_grad():
            layer.peer_mean.copy_(torch.rand(N, generator=gen, dtype=torch.float64))
    ref, ref64 = _oracles(layer, exact, gemm)
    for step in range(steps):
        xp, xn = (x.to(dev, torch.float32) for x in batch(gen, B, K))
        with autocast(dev, gemm):
            if labeled_classes:
                y_pos = torch.randint(0, labeled_classes, (B,), generator=gen)
                y_neg = wrong_labels(y_pos, labeled_classes, gen)
                ours = layer.ff_step_labeled(xp, y_pos.to(dev), y_neg.to(dev), labeled_classes)
                xp, xn = (embed_label(xp, y.to(dev), labeled_classes) for y in (y_pos, y_neg))
            else:
                ours = layer.ff_step(xp, xn)
        same = ref.step(xp, xn)  # the oracles need no autocast: their config says bf16 GEMMs
        truth = ref64.step(xp.double(), xn.double())
        assert all(t.dtype == torch.float32 for t in ours), "autocast steps return float32 outputs"
        check_outputs(f"step {step} ", ours, same, truth, ref.cfg, rule)
        for pname in ("weight", "bias") if bias else ("weight",):
            check(f"step {step} {pname}", getattr(layer, pname), getattr(ref, pname), getattr(ref64, pname), rule)
        if layer.config.peer_norm > 0:
            check(f"step {step} peer_mean", layer.peer_mean, ref.peer_mean, ref64.peer_mean, rule)
        states64 = {n: t for n, _, t in state_pairs(layer, ref64)}
        for name, a, t in state_pairs(layer, ref):
            check(f"step {step} {name}", a, t, states64[name], rule)
    assert all(t.dtype == torch.float32 for t in layer.state_dict().values() if isinstance(t, torch.Tensor))
    assert layer.config.gemm_dtype == "param"  # the layer keeps its own options; autocast is per call
    return layer


def _params(make):
    return [pytest.param(b, *args, id=f"{b.name}-{cid}", marks=b.marks) for b in AUTOCAST_BACKENDS
            for cid, *args in make(b)]


@pytest.mark.parametrize("backend,cfg,bias", _params(lambda b: option_cases(full=False)))
def test_every_option(backend, cfg, bias):
    run_autocast(backend, 7, 17, 33, steps=4, bias=bias, **cfg)


@pytest.mark.parametrize("backend,cfg,bias", _params(lambda b: [peer_options(i) for i in range(8)]))
def test_peer_norm(backend, cfg, bias):
    run_autocast(backend, 7, 130, 19, steps=4, bias=bias, **cfg)


SHAPES = [(1, 1, 1), (7, 17, 17), (64, 128, 17), (1, 130, 33), (7, 784, 33), (64, 784, 128)]


@pytest.mark.parametrize("backend,B,K,N", _params(lambda b: [(f"{B}x{K}x{N}", B, K, N) for B, K, N in SHAPES]))
def test_odd_shapes(backend, B, K, N):
    run_autocast(backend, B, K, N, steps=3, bias=B != 1, norm=("rms", "l2", "none")[B % 3])


@pytest.mark.parametrize("backend", backend_params(AUTOCAST_BACKENDS))
def test_many_steps(backend):
    """20 steps of a 784 -> 128 layer: the bf16 roundings must not grow into another trajectory."""
    run_autocast(backend, 64, 784, 128, steps=20)


def _sgd(backend):
    return [c for c in option_cases(full=False) if c[1]["optimizer"] == "sgd"]


def _fp16_params(make):
    return [pytest.param(b, *args, id=f"{b.name}-fp16-{cid}", marks=b.marks) for b in FP16_BACKENDS
            for cid, *args in make(b)]


@pytest.mark.parametrize("backend,cfg,bias", _fp16_params(lambda b: option_cases(full=False)))
def test_fp16_every_option(backend, cfg, bias):
    """autocast(dtype=float16): the same steps with fp16 GEMMs, against the oracle with gemm_dtype=float16."""
    run_autocast(backend, 7, 17, 33, steps=4, bias=bias, gemm="float16", **cfg)


@pytest.mark.parametrize("backend,B,K,N", _fp16_params(lambda b: [(f"{B}x{K}x{N}", B, K, N) for B, K, N in SHAPES]))
def test_fp16_odd_shapes(backend, B, K, N):
    run_autocast(backend, B, K, N, steps=3, bias=B != 1, norm=("rms", "l2", "none")[B % 3], gemm="float16",
                 peer_norm=0.1 if B == 7 else 0.0)


@pytest.mark.parametrize("backend,cfg,bias", _fp16_params(_sgd))
def test_fp16_labeled_vs_pair(backend, cfg, bias):
    """The labeled first layer with fp16 GEMMs against the exact math, the fp16 oracle on the pair as the yardstick
    (test_labeled_vs_pair says why)."""
    run_autocast(backend, 7, 40, 23, steps=3, bias=bias, labeled_classes=5, rule=AUTOCAST_PAIR, exact=True,
                 gemm="float16", **cfg)


@pytest.mark.parametrize("backend,cfg,bias", _params(_sgd))
def test_labeled_vs_pair(backend, cfg, bias):
    """The supervised first layer (cpu: its fused B-row kernel) under autocast, several steps, against the exact math
    (float64, no bf16 rounding) with the bf16 oracle on the explicit pair as the yardstick of bf16's own error
    (AUTOCAST_PAIR). Their roundings differ by design: the fused step adds the label term after the bf16 GEMM's
    rounding and rounds dL/dz+ + dL/dz- to bf16 once for the shared features, the pair rounds each half. SGD only:
    where the halves cancel (a pair that differs only in its label) a near-zero dW has either sign, which Adam's
    first steps turn into +-lr; test_labeled_grad checks every option's gradient."""
    run_autocast(backend, 7, 40, 23, steps=3, bias=bias, labeled_classes=5, rule=AUTOCAST_PAIR, exact=True, **cfg)


@pytest.mark.parametrize("backend,cfg,bias", _params(lambda b: option_cases(full=False) if b.namespace else []))
def test_labeled_grad(backend, cfg, bias):
    """ff_grad_labeled with bf16 GEMMs against the exact gradient (float64, no bf16 rounding) of the explicit pair,
    every option; the bf16 oracle on the pair is the yardstick (test_labeled_vs_pair says why)."""
    gen = torch.Generator().manual_seed(4)
    B, K, N, C = 7, 40, 23, 5
    cfg = FFConfig(**{"threshold": FFConfig.default_threshold(cfg["goodness"], N), **cfg})
    low = cfg.replace(gemm_dtype="bfloat16")
    w = (torch.randn(N, K, generator=gen) * K ** -0.5)
    b = torch.randn(N, generator=gen) * K ** -0.5 if bias else None
    x = batch(gen, B, K)[0].float()
    y_pos = torch.randint(0, C, (B,), generator=gen)
    y_neg = wrong_labels(y_pos, C, gen)
    dev = backend.device  # the op runs on its device; the oracles on the CPU
    r = backend.op("ff_grad_labeled")(*(t.to(dev) for t in (x, y_pos, y_neg)), C, 1.0, w.to(dev),
                                      None if b is None else b.to(dev), None, low.op_options)
    r = [t.cpu() for t in r]
    ours = type(oracle.ff_grad(x[:1], x[:1], w, b, cfg))(*r[:6], r[6] if bias else None)
    xp, xn = embed_label(x, y_pos, C), embed_label(x, y_neg, C)
    same = oracle.ff_grad(xp, xn, w, b, low)
    exact = oracle.ff_grad(xp.double(), xn.double(), w.double(), None if b is None else b.double(), cfg)
    check_outputs("", ours, same, exact, low, AUTOCAST_PAIR)


@pytest.mark.parametrize("backend,gemm", _gemm_params(AUTOCAST_BACKENDS))
def test_low_precision_is_what_runs(backend, gemm):
    """Under autocast the GEMMs really are bf16 (fp16): a kernel's h equals the oracle's with that GEMM dtype (the same
    library's GEMM on the same device: oneDNN, cuBLAS) far more closely than either equals the float32 step's."""
    dev = backend.device
    torch.manual_seed(3)
    layer = FFLinear(256, 64, backend=backend.name, device=dev)
    xp, xn = torch.rand(16, 256, device=dev), torch.rand(16, 256, device=dev)
    with autocast(dev, gemm):
        low = layer.ff_grad(xp, xn)
    full = layer.ff_grad(xp, xn)
    ref = oracle.ff_grad(xp, xn, layer.weight, layer.bias, layer.config.replace(gemm_dtype=gemm))
    scale = full.h_pos.abs().max().item()
    eps = torch.finfo(getattr(torch, gemm)).eps
    assert (low.h_pos - full.h_pos).abs().max().item() > eps / 64 * scale  # low-precision GEMMs, not fp32 ones
    assert (low.h_pos - ref.h_pos).abs().max().item() <= eps / 2 * scale
    assert low.grad_weight.dtype == torch.float32 and low.grad_bias.dtype == torch.float32


@pytest.mark.parametrize("backend", backend_params(AUTOCAST_BACKENDS))
def test_resume_mid_training(backend):
    """A state_dict saved between autocast steps resumes bit for bit: 3 + 3 steps == 6 steps."""
    dev = backend.device
    gen = torch.Generator().manual_seed(5)
    data = [tuple(x.to(dev) for x in batch(gen, 16, 40)) for _ in range(6)]
    kw = dict(backend=backend.name, device=dev, peer_norm=0.3, weight_decay=0.01)
    torch.manual_seed(0)
    straight = FFLinear(40, 24, **kw)
    torch.manual_seed(0)
    first = FFLinear(40, 24, **kw)
    with autocast(dev):
        for xp, xn in data:
            straight.ff_step(xp.float(), xn.float())
        for xp, xn in data[:3]:
            first.ff_step(xp.float(), xn.float())
    resumed = FFLinear(40, 24, **kw)
    resumed.load_state_dict(first.state_dict())
    with autocast(dev):
        for xp, xn in data[3:]:
            resumed.ff_step(xp.float(), xn.float())
    assert resumed.step_count == straight.step_count == 6
    for name, t in straight.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert t.dtype == torch.float32, name
            assert torch.equal(t, resumed.state_dict()[name]), name


@pytest.mark.parametrize("backend", backend_params(AUTOCAST_BACKENDS))
def test_net_steps(backend):
    """FFNet under autocast: the labeled first layer with a head and hard negatives, peer norm, several steps;
    parameters and state stay float32; losses follow the reference backend's within the bf16 rule."""
    dev = backend.device

    def make(name):
        torch.manual_seed(1)
        return FFNet([30, 20, 16], head=True, num_classes=4, peer_norm=0.1, backend=name, device=dev)
    ours, ref = make(backend.name), make("reference")
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.rand(8, 30, generator=gen).to(dev), torch.randint(0, 4, (8,), generator=gen).to(dev)
        with autocast(dev):
            a = ours.ff_step_labeled(x, y, None, 4, negatives="hard",
                                     generator=torch.Generator(device=dev).manual_seed(7))
            b = ref.ff_step_labeled(x, y, None, 4, negatives="hard",
                                    generator=torch.Generator(device=dev).manual_seed(7))
        assert a.losses.dtype == torch.float32 and torch.isfinite(a.losses).all()
        torch.testing.assert_close(a.losses, b.losses, rtol=2 ** -6, atol=2 ** -6 * b.losses.abs().max().item())
    for t in ours.state_dict().values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            assert t.dtype == torch.float32


def test_outside_autocast_the_config_is_the_layers_own():
    """Outside autocast (and for float64 weights inside it) the step gets the layer's FFConfig object itself: the
    ops see exactly the options they saw before mixed precision existed (plus gemm_dtype=param)."""
    cfg = FFConfig()
    w32, w64 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64)
    assert autocast_config(cfg, w32) is cfg
    assert cfg.op_options.endswith(";gemm_dtype=param")
    with autocast():
        assert autocast_config(cfg, w64) is cfg
        low = autocast_config(cfg, w32)
        assert low.gemm_dtype == "bfloat16" and low.replace(gemm_dtype="param") == cfg
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert autocast_config(cfg, w32) is cfg


@pytest.mark.parametrize("backend", backend_params(COMPILED_AUTOCAST))
def test_float64_under_autocast_is_unchanged(backend):
    """Autocast leaves float64 layers alone (as nn.Linear): the same bits inside and outside it."""
    dev = backend.device

    def run(ctx):
        torch.manual_seed(0)
        layer = FFLinear(20, 9, backend=backend.name, dtype=torch.float64, device=dev)
        gen = torch.Generator().manual_seed(1)
        with ctx:
            outs = [layer.ff_step(*(x.to(dev) for x in batch(gen, 5, 20))) for _ in range(3)]
        return outs, layer.state_dict()
    (a, sa), (b, sb) = run(autocast(dev)), run(torch.autocast(torch.device(dev).type, enabled=False))
    for x, y in zip(a, b):
        for t, u in zip(x, y):
            assert torch.equal(t, u)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("backend", backend_params(AUTOCAST_OPS))
def test_ops_ignore_an_enclosing_autocast(backend):
    """The ops compute what their options say: gemm_dtype=param under an enclosing autocast gives the fp32 result
    bit for bit (the kernels' own at::mm is not recast), and the split path equals the fused step."""
    s = sample_inputs("ff_grad", backend.device)[0]
    op = backend.op("ff_grad")
    plain = op(*s.args("ff_grad"))
    with autocast(backend.device):
        inside = op(*s.args("ff_grad"))
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,gemm,op,i", [pytest.param(b, g, op, i, id=f"{b.name}-{g}-{op}-{sid}", marks=b.marks)
                                               for b in AUTOCAST_OPS for g in LOW_GEMMS
                                               if g in BACKENDS[b.name].gemm_dtypes
                                               for op in b.op_names if op != "ff_update"
                                               for i, sid in enumerate(sample_ids(op))])
def test_opcheck_low_precision(backend, gemm, op, i):
    """torch.library.opcheck with gemm_dtype=bfloat16 (float16) in the options: schemas, fakes, dispatch unchanged."""
    s = sample_inputs(op, backend.device)[i]
    s.cfg = s.cfg.replace(gemm_dtype=gemm)
    torch.library.opcheck(backend.op(op), s.args(op))


@pytest.mark.parametrize("backend,gemm", _gemm_params(AUTOCAST_OPS))
def test_step_equals_grad_then_update(backend, gemm):
    """Under autocast too, ff_step == ff_grad then ff_update (the update reads the same dW, rounded to bf16 (fp16) by
    its GEMM, then widened)."""
    import ffkernels
    s = sample_inputs("ff_step", backend.device)[0]
    cfg = s.cfg
    with autocast(backend.device, gemm):
        a = s.clone()
        out = ffkernels.ff_step(a["x_pos"], a["x_neg"], a["weight"], a["bias"], a.states("weight"), a.states("bias"),
                                a.step, cfg, peer_mean=a["peer_mean"], backend=backend.name)
        b = s.clone()
        g = ffkernels.ff_grad(b["x_pos"], b["x_neg"], b["weight"], b["bias"], cfg, peer_mean=b["peer_mean"],
                              backend=backend.name)
    assert torch.equal(out.loss, g.loss) and torch.equal(out.h_pos, g.h_pos)
    gw = g.grad_weight
    assert torch.equal(gw, gw.to(getattr(torch, gemm)).float()), "the dW of bf16 (fp16) GEMMs is a widened one"
    ffkernels.ff_update(b["weight"], b["bias"], gw, g.grad_bias, b.states("weight"), b.states("bias"), b.step, cfg,
                        loss=g.loss, backend=backend.name)
    for name in ("weight", "bias", "state1_weight", "state2_weight"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("backend", backend_params([TRITON]))
@pytest.mark.parametrize("labeled", [False, True], ids=["pair", "labeled"])
def test_triton_row_split(backend, labeled):
    """Triton's kernel 3 split over the rows (B = 300 per side, three splits of 128 under the interpreter; kernel 3b
    adds the fp32 partials, then rounds dW to bf16 once): steps against the bf16 oracle, and ff_step == ff_grad +
    ff_update with the split, the gradient a widened bf16 tensor."""
    import importlib
    settings = importlib.import_module(f"{TRITON_PACKAGE}.settings")
    with settings.force_row_splits(3):
        if labeled:
            run_autocast(backend, 300, 40, 24, steps=2, labeled_classes=10, rule=AUTOCAST_PAIR, exact=True,
                         optimizer="sgd", momentum=0.9, peer_norm=0.3)
            return
        run_autocast(backend, 300, 40, 24, steps=2, peer_norm=0.3, weight_decay=0.01)
        gen = torch.Generator().manual_seed(6)
        dev = backend.device
        xp, xn = (x.to(dev, torch.float32) for x in batch(gen, 300, 40))
        cfg = FFConfig(threshold=24.0, peer_norm=0.3, gemm_dtype="bfloat16")
        w = (torch.randn(24, 40, generator=gen) / 40 ** 0.5).to(dev)
        b = (torch.randn(24, generator=gen) / 40 ** 0.5).to(dev)
        r = torch.rand(24, generator=gen).to(dev)
        tri = BACKENDS["triton"]
        w1, b1, r1 = w.clone(), b.clone(), r.clone()
        sw1, sb1 = (torch.zeros_like(w), torch.zeros_like(w)), (torch.zeros_like(b), torch.zeros_like(b))
        out = tri.step(xp, xn, w1, b1, sw1, sb1, 1, cfg, peer_mean=r1)
        g = tri.grad(xp, xn, w, b, cfg, peer_mean=r)
        assert torch.equal(out.loss, g.loss) and torch.equal(out.h_neg, g.h_neg)
        assert torch.equal(g.grad_weight, g.grad_weight.to(BF16).float())
        w2, b2 = w.clone(), b.clone()
        sw2, sb2 = (torch.zeros_like(w), torch.zeros_like(w)), (torch.zeros_like(b), torch.zeros_like(b))
        tri.update(w2, b2, g.grad_weight, g.grad_bias, sw2, sb2, 1, cfg, loss=g.loss)
        for x, y in ((w1, w2), (b1, b2), *zip(sw1, sw2), *zip(sb1, sb2)):
            assert torch.equal(x, y)


# ---- refusals ------------------------------------------------------------------------------------------
# parametrized over what the backends declare (gemm_dtypes), so the tests stay right whichever backends refuse what

@pytest.mark.parametrize("name,gemm", [pytest.param(b.name, g, id=f"{b.name}-{g}") for b, g in REFUSED])
def test_backends_refuse_the_gemm_dtypes_they_lack(name, gemm):
    """A backend without bf16 (fp16) GEMMs for float32 weights: a step under autocast raises, naming why, rather than
    running in fp32. Checked where it is decided (no GPU needed)."""
    with pytest.raises(BackendUnavailableError, match=f"no {gemm} GEMMs"):
        check_gemm_dtype(BACKENDS[name], FFConfig(gemm_dtype=gemm))


@pytest.mark.parametrize("backend,gemm", [pytest.param(b, g, id=f"{b.name}-{g}", marks=b.marks) for b, g in REFUSED])
def test_refused_under_autocast(backend, gemm):
    """The layer's step under such an autocast raises and changes nothing; the backend's op refuses the option too
    (RuntimeError from the C++ binding; NotImplementedError, a RuntimeError, from the Triton ops)."""
    dev = backend.device
    layer = FFLinear(12, 5, backend=backend.name, device=dev)
    x = torch.rand(3, 12, device=dev)
    w0 = layer.weight.detach().clone()
    with autocast(dev, gemm), pytest.raises(BackendUnavailableError, match=f"{backend.name}.*no {gemm} GEMMs"):
        layer.ff_step(x, x)
    assert torch.equal(layer.weight, w0) and layer.step_count == 0
    if backend.namespace is None:
        return
    s = sample_inputs("ff_grad", dev)[0]
    s.cfg = s.cfg.replace(gemm_dtype=gemm)
    with pytest.raises(RuntimeError, match=f"no {gemm} GEMMs"):
        backend.op("ff_grad")(*s.args("ff_grad"))


@pytest.mark.parametrize("backend,gemm", _gemm_params(AUTOCAST_OPS))
def test_ops_need_float32_weights(backend, gemm):
    """Lower-precision GEMMs are for fp32 master weights: the ops (C++ binding, Triton) refuse them for float64
    weights."""
    s64 = sample_inputs("ff_grad", backend.device, dtype=torch.float64)[0]
    s64.cfg = s64.cfg.replace(gemm_dtype=gemm)
    with pytest.raises(TypeError, match="needs? float32 weights"):
        backend.op("ff_grad")(*s64.args("ff_grad"))


# ---- the rules that do not change under autocast -------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params(AUTOCAST_BACKENDS))
def test_non_finite_rule(backend):
    """A NaN input under autocast: NonFiniteLossError, weights, state and peer_mean unchanged; in a net, the error
    names the layer and the layers after it are unchanged."""
    dev = backend.device
    layer = FFLinear(10, 6, backend=backend.name, peer_norm=0.5, device=dev)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    x = torch.rand(4, 10, device=dev)
    bad = x.clone()
    bad[1, 3] = float("nan")
    with autocast(dev), pytest.raises(NonFiniteLossError):
        layer.ff_step(bad, x)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    assert layer.step_count == 0
    net = FFNet([10, 8, 6], backend=backend.name, device=dev)
    net_before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    with autocast(dev), pytest.raises(NonFiniteLossError, match="layer 0"):
        net.ff_step(bad, x)
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, net_before[k]), k


@pytest.mark.parametrize("backend", backend_params(COMPILED_AUTOCAST))
def test_one_host_sync_per_net_step(backend):
    """One host sync per FFNet step under autocast too (on CUDA counted by torch's sync debug mode as well)."""
    from test_host_syncs import syncs_of

    dev = backend.device
    net = FFNet([30, 16, 16, 16], head=True, num_classes=4, peer_norm=0.1, backend=backend.name, device=dev)
    x, y = torch.rand(8, 30, device=dev), torch.randint(0, 4, (8,), device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with autocast(dev):
        net.ff_step_labeled(x, y, None, 4, negatives="hard", generator=gen)  # warm-up
        n, calls = syncs_of(lambda: net.ff_step_labeled(x, y, None, 4, negatives="hard", generator=gen))
        assert n <= 1, calls
        n, calls = syncs_of(lambda: net.ff_step(x, x.flip(0)))
        assert n <= 1, calls


def test_forward_follows_autocast_like_linear():
    """layer(x) is nn.Linear + ReLU under autocast: bf16 out, as nn.Linear's would be."""
    layer = FFLinear(12, 5, backend="reference")
    x = torch.rand(3, 12)
    with autocast():
        y = layer(x)
        lin = torch.nn.functional.linear(oracle.normalize(x, "rms", 1e-8), layer.weight, layer.bias).relu()
    assert y.dtype == BF16 and torch.equal(y, lin)
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("backend", backend_params(AUTOCAST_BACKENDS))
def test_forward_sees_the_steps_inside_one_autocast_region(backend):
    """torch.autocast caches the casts of leaf parameters for its whole region; the steps update the weights in place
    inside it. layer(x) and ff_forward(x) after a step in the same region use the updated weights."""
    dev = backend.device
    layer = FFLinear(12, 5, backend=backend.name, lr=0.1, device=dev)
    x = torch.rand(3, 12, device=dev)
    with autocast(dev):
        before = layer(x)
        layer.ff_step(x, torch.rand(3, 12, device=dev))
        after, ff_after = layer(x), layer.ff_forward(x)
    with autocast(dev):  # a fresh region: nothing cached
        fresh, ff_fresh = layer(x), layer.ff_forward(x)
    assert torch.equal(after, fresh) and torch.equal(ff_after, ff_fresh) and not torch.equal(before, after)
    assert ff_after.dtype == torch.float32 and after.dtype == BF16


def test_reference_is_autocast_of_its_own_math():
    """The oracle's bf16 GEMM is torch.autocast's: F.linear under autocast gives the same z (no bias)."""
    x, w = torch.rand(5, 16), torch.rand(7, 16)
    from ffkernels.backends.reference import linear
    with autocast():
        auto = torch.nn.functional.linear(x, w)
    assert torch.equal(linear(x, w, None, "bfloat16"), auto.float())


# ---- the commands ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "study", "bench"])
def test_precision_option(command):
    """--precision {fp32, bf16}, default fp32, on train, study and bench."""
    import argparse
    import importlib

    from ffkernels.cli import COMMANDS
    from ffkernels.cli_options import HelpFormatter

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    opt = {a.dest: a for a in p._actions}["precision"]
    assert tuple(opt.choices) == ("fp32", "bf16") and opt.default == "fp32"


@pytest.mark.parametrize("backend", backend_params([CPU]))
def test_train_bf16(backend, tmp_path):
    """ffkernels train --precision bf16 trains (digits, one epoch) and records its precision; the saved weights and
    optimizer state are float32."""
    import json

    from ffkernels.train_cli import main

    out = tmp_path / "run.json"
    main(["--dataset", "digits", "--epochs", "1", "--hidden", "32", "32", "--precision", "bf16", "--no-progress",
          "--threads", "1", "--json", str(out), "--save", str(tmp_path / "net.pt")])
    result = json.loads(out.read_text())
    assert result["precision"] == "bf16" and 0.0 <= result["test_accuracy"] <= 1.0
    state = torch.load(tmp_path / "net.pt")
    assert all(t.dtype in (torch.float32, torch.int64) for t in state.values() if isinstance(t, torch.Tensor))


def test_precision_context_has_no_stale_weight_casts():
    """The commands' autocast region spans epochs of in-place updates (BP's torch.optim too): no weight cache."""
    from ffkernels.precision import precision_context

    lin = torch.nn.Linear(3, 2)
    x = torch.ones(1, 3)
    with precision_context("bf16", "cpu"):
        a = lin(x)
        with torch.no_grad():
            lin.weight.add_(1.0)
        b = lin(x)
    assert a.dtype == BF16 and not torch.equal(a, b)


def test_study_precision_in_its_config():
    """bf16 is a setting of the study (another fingerprint); fp32 is left out, so earlier studies keep theirs."""
    from ffkernels.study.config import StudyConfig

    fp32, bf16 = StudyConfig(), StudyConfig(precision="bf16")
    assert "precision" not in fp32.to_dict() and bf16.to_dict()["precision"] == "bf16"
    assert fp32.fingerprint() != bf16.fingerprint()
    assert StudyConfig.from_dict(bf16.to_dict()) == bf16 and StudyConfig.from_dict(fp32.to_dict()) == fp32
    assert fp32.differences(bf16) == ["precision: 'fp32' -> 'bf16'"]
    with pytest.raises(ValueError, match="precision"):
        StudyConfig(precision="fp16")


@pytest.mark.parametrize("backend", backend_params([CPU]))
def test_bench_bf16_cases(backend, tmp_path):
    """bench --precision bf16: fused-cpu-bf16 and labeled-cpu-bf16 beside the fp32 cases, their speed-up over them,
    and floor-bf16 as their floor (timings are reported, never asserted)."""
    import json

    from ffkernels.bench.cli import main

    out = tmp_path / "b.json"
    main(["--quick", "--no-network", "--precision", "bf16", "--backends", "cpu", "--shapes", "4x12x8", "--repeats",
          "1", "--warmup", "0", "--no-progress", "--json", str(out)])
    rows = {r["case"]: r for r in json.loads(out.read_text())["layer"]["rows"]}
    for case in ("fused-cpu-bf16", "labeled-cpu-bf16", "floor-bf16", "fused-cpu", "floor"):
        assert rows[case]["time"] is not None, case
    assert rows["fused-cpu-bf16"]["precision"] == "bf16" and rows["fused-cpu-bf16"]["speedup_over_fp32"] > 0
    assert "speedup_over_fp32" not in rows["floor-bf16"] and "precision" not in rows["fused-cpu"]


def test_info_says_whether_the_cpu_has_bf16_units():
    from ffkernels.info import collect

    info = collect()
    assert info["cpu_bf16"].startswith(("yes", "no", "unknown"))
    assert info["autocast_gemm_dtypes"]["cpu"] == ["bfloat16"]
    assert info["autocast_gemm_dtypes"]["cuda"] == ["bfloat16", "float16"]
