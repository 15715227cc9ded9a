"""Train a backend and the oracle side by side on the same data, checking everything at every step."""
from __future__ import annotations

import torch

import oracle
from ffkernels import FFLinear, embed_label, wrong_labels
from tolerance import check, check_outputs, rule_for


def state_pairs(layer: FFLinear, ref: oracle.FFLayerRef):
    """(name, ours, torch.optim's) for every optimizer state tensor of the layer."""
    out = []
    for pname in ("weight", "bias"):
        p = getattr(ref, pname)
        if p is None:
            continue
        st = ref.state_of(p)
        for s in layer.config.state_names:
            if s in st and st[s] is not None:
                out.append((f"{s}_{pname}", getattr(layer, f"{s}_{pname}"), st[s]))
    return out


def batch(gen, B, K):
    """Positives and negatives from different distributions, so that the loss meets both its regimes: pairs the
    layer already separates (a loss near 0, softplus far in its tail) and pairs it does not."""
    xp = torch.randn(B, K, generator=gen, dtype=torch.float64) + 0.5
    xn = 1.5 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    if K == 1:  # normalized, a 1-feature row is just its sign: keep pos and neg apart, else the true
        xp, xn = xp.abs(), -xn.abs()  # gradient can be 0 and Adam would amplify rounding noise to +-lr
    return xp, xn


def run_and_compare(backend, B, K, N, *, steps=3, bias=True, dtype=torch.float32, seed=0, labeled_classes=None,
                    label_value=1.0, dead_unit=False, **cfg):
    """``steps`` FFLinear steps on ``backend`` (a tests.backends.Backend) against the oracle, checking the outputs,
    parameters and optimizer state after every step with tolerance.py's rule for ``dtype`` on that device.

    The oracle runs in ``dtype`` and, for lower precisions, in float64 from the same rounded inputs and initial
    weights. With ``labeled_classes=C`` the backend runs FFLinear.ff_step_labeled(x, y_pos, y_neg, C) and the
    oracle the explicit pair embed_label(x, y_pos), embed_label(x, y_neg).

    With peer normalization on (``peer_norm > 0``) the running mean r starts random (so that mu r matters), the
    oracle starts from the same r, and r is compared after every step too. ``dead_unit``: unit 0 starts off for
    every row (zero weights, bias -1), so at first only peer normalization's straight-through term moves it.
    """
    dev = backend.device
    rule = rule_for(dtype, backend.gpu)
    torch.manual_seed(seed)
    layer = FFLinear(K, N, bias=bias, backend=backend.name, device=dev, dtype=dtype, **cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    peer = layer.config.peer_norm > 0
    with torch.no_grad():
        if peer:
            layer.peer_mean.copy_(torch.rand(N, generator=gen, dtype=torch.float64))
        if dead_unit:
            layer.weight[0] = 0.0
            if bias:
                layer.bias[0] = -1.0
    r = layer.peer_mean if peer else None
    ref = oracle.FFLayerRef(layer.weight, layer.bias, layer.config, peer_mean=r)
    exact = dtype == torch.float64
    ref64 = ref if exact else oracle.FFLayerRef(layer.weight.double(),
                                                None if layer.bias is None else layer.bias.double(), ref.cfg,
                                                peer_mean=None if r is None else r.double())
    for step in range(steps):
        xp, xn = (x.to(dev, dtype) for x in batch(gen, B, K))
        if labeled_classes:
            y_pos = torch.randint(0, labeled_classes, (B,), generator=gen)
            y_neg = wrong_labels(y_pos, labeled_classes, gen)
            ours = layer.ff_step_labeled(xp, y_pos.to(dev), y_neg.to(dev), labeled_classes, label_value)
            xp, xn = (embed_label(xp, y.to(dev), labeled_classes, label_value) for y in (y_pos, y_neg))
        else:
            ours = layer.ff_step(xp, xn)
        same = ref.step(xp, xn)
        truth = same if exact else ref64.step(xp.double(), xn.double())
        check_outputs(f"step {step} ", ours, same, truth, ref.cfg, rule)
        for pname in ("weight", "bias") if bias else ("weight",):
            check(f"step {step} {pname}", getattr(layer, pname), getattr(ref, pname), getattr(ref64, pname), rule)
        if peer:
            check(f"step {step} peer_mean", layer.peer_mean, ref.peer_mean, ref64.peer_mean, rule)
        states64 = {n: t for n, _, t in state_pairs(layer, ref64)}
        for name, a, t in state_pairs(layer, ref):
            check(f"step {step} {name}", a, t, states64[name], rule)
    assert layer.step_count == steps
    return layer, ref


def assert_resumes_bit_for_bit(make_net, batches, step, split: int = 3) -> dict:
    """A net trained on ``batches`` in one go equals one trained on the first ``split``, saved, loaded into a fresh
    net (other seed) and trained on the rest: every tensor of the state_dict bit for bit. ``make_net(seed)`` builds
    a net, ``step(net, batch)`` trains it on one batch. Returns the state_dict."""
    a = make_net(0)
    for batch in batches:
        step(a, batch)
    b = make_net(0)
    for batch in batches[:split]:
        step(b, batch)
    c = make_net(9)
    c.load_state_dict(b.state_dict())
    for batch in batches[split:]:
        step(c, batch)
    sa, sc = a.state_dict(), c.state_dict()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sc[k]), k
    return sa
