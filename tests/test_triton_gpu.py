"""The Triton backend on a GPU in float16/bfloat16 (and float32) against the same-precision reference, FlashAttention
style (tolerance.py), the fused step and the labeled first layer, with kernel 3's split over the rows where the rule
takes it. Skipped without a CUDA GPU; everything else about the backend is in the behaviour tests, which run it on
the GPU too."""
import pytest
import torch

import oracle
from backends import CUDA, INTERPRET
from ffkernels import FFConfig, FFGradOutput, embed_label
from ffkernels.backends import get_backend
from tolerance import check, check_outputs, rule_for

pytestmark = [pytest.mark.gpu, pytest.mark.triton,
              pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [((64, 784, 512), dict(goodness="sum", norm="rms", loss="hinton", optimizer="adam", lr=3e-3)),
         ((7, 17, 33), dict(goodness="mean", norm="l2", loss="symba", optimizer="sgd", lr=0.02, momentum=0.5,
                            weight_decay=0.1)),
         ((33, 200, 130), dict(goodness="sum", norm="none", loss="symba", optimizer="adam", lr=1e-2,
                               betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
         # few W tiles for many rows: kernel 3 splits the rows on its own (settings.row_splits; 8 splits on an H200)
         ((1024, 128, 128), dict(goodness="sum", norm="rms", loss="hinton", optimizer="sgd", lr=0.02, momentum=0.9)),
         ((17, 200, 65), dict(goodness="sum", norm="rms", loss="scff", threshold_neg=80.0, scff_lambda=0.05,
                              optimizer="adam", lr=3e-3))]


def _reference_step_like_kernels(x_pos, x_neg, w, b, states_w, states_b, step, cfg):
    """The reference with the backend's precision rules: gradient by autograd in the parameter dtype, update in
    float32 (float64 for float64) on the upcast parameter with the state in that precision, rounded back."""
    g = oracle.ff_grad(x_pos, x_neg, w, b, cfg)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    params = [w.to(acc), b.to(acc)]
    oracle.optimizer_update(params, [g.grad_weight.to(acc), g.grad_bias.to(acc)], [states_w, states_b], step, cfg)
    w.copy_(params[0])
    b.copy_(params[1])
    return g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,opts", CASES, ids=["x".join(map(str, s)) for s, _ in CASES])
def test_matches_the_same_precision_reference(dtype, shape, opts):
    B, K, N = shape
    cfg = FFConfig(threshold=FFConfig.default_threshold(opts["goodness"], N), **opts)
    triton = get_backend("triton")
    torch.manual_seed(60)
    w0 = (torch.rand(N, K, device="cuda", dtype=torch.float64) * 2 - 1) / K ** 0.5
    b0 = (torch.rand(N, device="cuda", dtype=torch.float64) * 2 - 1) / K ** 0.5

    def fresh(dt, state_dt):
        return [w0.to(dt), b0.to(dt), tuple(torch.zeros_like(w0, dtype=state_dt) for _ in cfg.state_names),
                tuple(torch.zeros_like(b0, dtype=state_dt) for _ in cfg.state_names)]

    mine, low, truth = fresh(dtype, torch.float32), fresh(dtype, torch.float32), fresh(torch.float64, torch.float64)
    rule = rule_for(dtype, gpu=True)
    gen = torch.Generator().manual_seed(61)
    for step in range(1, 4):
        x_pos = (torch.randn(B, K, generator=gen, dtype=torch.float64) + 0.5).cuda()
        x_neg = (1.5 * torch.randn(B, K, generator=gen, dtype=torch.float64)).cuda()
        xp, xn = x_pos.to(dtype), x_neg.to(dtype)
        g_mine = triton.grad(xp, xn, mine[0], mine[1], cfg)
        out = triton.step(xp, xn, *mine, step, cfg)
        g_low = _reference_step_like_kernels(xp, xn, *low, step, cfg)
        g_truth = _reference_step_like_kernels(x_pos, x_neg, *truth, step, cfg)
        check_outputs(f"{dtype} step {step} ", g_mine, g_low, g_truth, cfg, rule)
        for field, a, e in zip(out._fields, out, g_mine):
            assert torch.equal(a, e), f"step and grad disagree on {field}"
        for name, i in (("weight", 0), ("bias", 1)):
            check(f"{dtype} step {step} {name}", mine[i], low[i], truth[i], rule)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [7, 1024], ids=str)
@pytest.mark.parametrize("peer", [False, True], ids=["plain", "peer"])
def test_labeled_matches_the_same_precision_reference(dtype, B, peer):
    """ff_grad_labeled (kernels 1L, 2, 3 LABELED; 1024 rows split kernel 3 on an H200) against the oracle on the
    explicit pair."""
    K, N, C = 128, 96, 10
    cfg = FFConfig(threshold=float(N), loss="symba", peer_norm=0.3 if peer else 0.0)
    gen = torch.Generator().manual_seed(62)
    x = torch.randn(B, K, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(N, K, generator=gen, dtype=torch.float64) / K ** 0.5
    b = torch.randn(N, generator=gen, dtype=torch.float64) / K ** 0.5
    r = torch.rand(N, generator=gen, dtype=torch.float64).cuda() if peer else None
    y_pos, y_neg = torch.randint(0, C, (B,), generator=gen).cuda(), torch.randint(0, C, (B,), generator=gen).cuda()
    xd, wd, bd = (t.to("cuda", dtype) for t in (x, w, b))
    ours = FFGradOutput(*torch.ops.ffkernels_triton.ff_grad_labeled(
        xd, y_pos, y_neg, C, 1.0, wd, bd, r.float() if peer else None, cfg.op_options))
    refs = []
    for t, tw, tb, tr in ((xd, wd, bd, r.float() if peer else None), (xd.double(), wd.double(), bd.double(), r)):
        pair = [embed_label(t, y, C) for y in (y_pos, y_neg)]
        refs.append(oracle.ff_grad(*pair, tw, tb, cfg, tr))
    check_outputs(f"{dtype} B={B} ", ours, *refs, cfg, rule_for(dtype, gpu=True))
