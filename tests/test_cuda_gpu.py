"""The CUDA C++ backend in float16/bfloat16 on a GPU (float32/float64 run in the behaviour tests, like every backend):
against the same-precision reference, FlashAttention style (tolerance.py); fp32 optimizer state; a non-finite loss
changes nothing; the gradient is bitwise reproducible. Also what the behaviour tests' small batches do not reach: the
pair epilogue with several pairs per block (B > 512), for the plain and the labeled first layer (whose fp16/bf16 are
checked here too). Skipped without a GPU and a CUDA build."""
import itertools

import pytest
import torch

import ffkernels
import oracle
from backends import CUDA_BACKEND
from ffkernels import FFConfig, NonFiniteLossError, functional
from tolerance import FP32_CPU, check, check_outputs, lowp, one_rounding, rule_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA_BACKEND.skip_reason is not None,
                                                  reason=f"cuda: {CUDA_BACKEND.skip_reason}")]

LOWP = [torch.float16, torch.bfloat16]
LOWP_SHAPES = [(1, 17, 128), (7, 784, 17), (64, 128, 784)]
LOSS_OPTIONS = [dict(norm=n, goodness=g, loss=loss) for n, g, loss in
                itertools.product(("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba", "scff"))]
OPTIM_OPTIONS = [
    dict(optimizer="adam"),
    dict(optimizer="adam", betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, lr=1e-2),
    dict(optimizer="sgd", lr=0.05),
    dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
]
STEPS = 3


def _inputs(B, K, dtype):
    return torch.randn(B, K, device="cuda", dtype=dtype), torch.randn(B, K, device="cuda", dtype=dtype)


def _state_like(p, cfg):
    return tuple(torch.zeros_like(p, dtype=torch.float32) for _ in cfg.state_names)


def _lowp_reference_update(params, grads, states, step, cfg):
    """torch.optim on fp32 copies with fp32 state, rounded back: the update the design specifies."""
    params32 = [p.float() for p in params]
    oracle.optimizer_update(params32, [g.float() for g in grads], states, step, cfg)
    for p, p32 in zip(params, params32):
        p.copy_(p32)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("B,K,N", LOWP_SHAPES, ids=str)
@pytest.mark.parametrize("loss_opts", LOSS_OPTIONS, ids=lambda o: "-".join(o.values()))
def test_lowp_grad_within_reference_error(dtype, B, K, N, loss_opts):
    torch.manual_seed(1)
    th = FFConfig.default_threshold(loss_opts["goodness"], N)
    scff = dict(threshold_neg=1.25 * th, scff_lambda=0.1) if loss_opts["loss"] == "scff" else {}
    cfg = FFConfig(threshold=th, **loss_opts, **scff)
    w = (torch.rand(N, K, device="cuda") * 2 - 1).div(K ** 0.5).to(dtype)
    b = (torch.rand(N, device="cuda") * 2 - 1).div(K ** 0.5).to(dtype)
    x_pos, x_neg = _inputs(B, K, dtype)
    ours = functional.ff_grad(x_pos, x_neg, w, b, cfg, backend="cuda")
    same = oracle.ff_grad(x_pos, x_neg, w, b, cfg)
    exact = oracle.ff_grad(x_pos.double(), x_neg.double(), w.double(), b.double(), cfg)
    for name, a, r, t in zip(ours._fields, ours, same, exact):
        assert a.dtype == dtype, f"{name} is returned in the input dtype"
        check(name, a, r, t, lowp(dtype))


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
        for what, got, want in (("weight", w, w_ref), ("bias", b, b_ref)):  # at most one rounding apart
            check(f"step {step} {what}", got, want, want, one_rounding(dtype))
        for got, want in zip(st_w + st_b, st_w_ref + st_b_ref):
            assert got.dtype == torch.float32
            check(f"step {step} state", got, want, want, FP32_CPU)


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
    rule = lowp(dtype)
    for step in range(1, STEPS + 1):
        x_pos, x_neg = _inputs(B, K, dtype)
        ours = functional.ff_step(x_pos, x_neg, w, b, *st["ours"], step, cfg, backend="cuda")
        same = oracle.ff_grad(x_pos, x_neg, w_same, b_same, cfg)
        _lowp_reference_update([w_same, b_same], [same.grad_weight, same.grad_bias], st["same"], step, cfg)
        exact = oracle.ff_grad(x_pos.double(), x_neg.double(), w64, b64, cfg)
        oracle.optimizer_update([w64, b64], [exact.grad_weight, exact.grad_bias], st64, step, cfg)
        for name, a, r, t in zip(ours._fields, ours, same, exact):
            check(f"step {step} {name}", a, r, t, rule)
        check(f"step {step} weight", w, w_same, w64, rule)
        check(f"step {step} bias", b, b_same, b64, rule)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_state_dtype_for_lowp_params(dtype):
    layer = ffkernels.FFLinear(17, 9, backend="cuda", device="cuda", dtype=dtype)
    layer.ff_step(*_inputs(4, 17, dtype))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("exp_avg_weight", "exp_avg_sq_weight", "exp_avg_bias", "exp_avg_sq_bias"):
        buf = getattr(layer, name)
        assert buf.dtype == want and buf.device.type == "cuda", name
        assert buf.abs().sum() > 0, f"{name} was not updated"


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("how", ["nan-input", "inf-input", "overflow"])
def test_lowp_non_finite_loss_changes_nothing(dtype, optimizer, how):
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
    out = functional.ff_step(x_pos, x_neg, layer.weight, layer.bias, layer._states("weight"),
                             layer._states("bias"), layer.step_count + 1, layer.config, backend="cuda")
    assert not torch.isfinite(out.loss)
    for k, v in _snapshot(layer).items():
        assert torch.equal(before[k], v), k
    with pytest.raises(NonFiniteLossError):
        layer.ff_step(x_pos, x_neg)
    assert layer.step_count == step_count
    for k, v in _snapshot(layer).items():
        assert torch.equal(before[k], v), k


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


# the pair epilogue takes several pairs per block from B = 513 pairs on (csrc/cuda/ff_rows.cuh pairs_per_block): the
# bias gradient's block partials and the labeled layer's label columns, at B where a block holds 3 pairs (the last
# one fewer), against the oracle; labeled or on the explicit pair, with peer normalization
MANY_PAIRS = 1100


def _grad_case(dtype, labeled, peer, seed=5, B=MANY_PAIRS, K=70, N=300, C=10):
    gen = torch.Generator().manual_seed(seed)
    cfg = FFConfig(threshold=float(N), peer_norm=0.3 if peer else 0.0, loss="symba" if labeled else "hinton")
    x_pos = torch.randn(B, K, generator=gen, dtype=torch.float64) + 0.5
    x_neg = 1.5 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64) / K ** 0.5
    b = torch.randn(N, generator=gen, dtype=torch.float64) / K ** 0.5
    r = torch.rand(N, generator=gen, dtype=torch.float64) if peer else None
    y_pos, y_neg = torch.randint(0, C, (B,), generator=gen), torch.randint(0, C, (B,), generator=gen)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    t = [a.to("cuda", dtype) for a in (x_pos, x_neg, w, b)] + [r.to("cuda", state) if peer else None]
    if labeled:
        x = t[0]
        raw = torch.ops.ffkernels.ff_grad_labeled(x, y_pos.cuda(), y_neg.cuda(), C, 1.0, t[2], t[3], t[4],
                                                  cfg.op_options)
        ours = ffkernels.FFGradOutput(*raw)
        pair = [ffkernels.embed_label(x, y_pos.cuda(), C), ffkernels.embed_label(x, y_neg.cuda(), C)]
    else:
        ours = functional.ff_grad(*t[:4], cfg, peer_mean=t[4], backend="cuda")
        pair = t[:2]
    same = oracle.ff_grad(*pair, t[2], t[3], cfg, t[4])
    exact = oracle.ff_grad(*[p.double() for p in pair], t[2].double(), t[3].double(), cfg,
                           t[4].double() if peer else None)
    return ours, same, exact, cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("labeled", [False, True], ids=["pair", "labeled"])
@pytest.mark.parametrize("peer", [False, True], ids=["plain", "peer"])
def test_grad_with_several_pairs_per_block(dtype, labeled, peer):
    ours, same, exact, cfg = _grad_case(dtype, labeled, peer)
    check_outputs("", ours, same, exact, cfg, rule_for(dtype, gpu=True))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("B", [7, MANY_PAIRS], ids=str)
@pytest.mark.parametrize("peer", [False, True], ids=["plain", "peer"])
def test_lowp_labeled_grad_within_reference_error(dtype, B, peer):
    ours, same, exact, cfg = _grad_case(dtype, True, peer, B=B)
    for name, a in zip(ours._fields, ours):
        assert a.dtype == dtype, f"{name} is returned in the input dtype"
    check_outputs("", ours, same, exact, cfg, lowp(dtype))


def test_labeled_grad_is_bitwise_reproducible():
    first = _grad_case(torch.float32, True, True)[0]
    for _ in range(2):
        for name, a, c in zip(first._fields, first, _grad_case(torch.float32, True, True)[0]):
            assert torch.equal(a, c), name
