"""FFConv2d, FFLinear's competitive step and FFNet(modules=...) at the module level (docs/design.md, "Convolutional FF",
"FF CNNs"): the conv oracle against its formulas written out by hand and central differences, nn.Conv2d drop-in
behaviour, the container against a plain autograd per-layer loop, resume, one host sync, the non-finite rule and bad
input. The kernels against the oracle: test_conv_cpu.py."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffkernels
from ffkernels import FFConv2d, FFLinear, FFNet, NonFiniteLossError
from ffkernels._types import ConvGeometry
from ffkernels.backends import available_backends, get_backend
from ffkernels.backends.reference_conv import conv_grad, conv_objective
from ffkernels.config import FFConfig
from oracle import central_difference
from test_host_syncs import count_syncs
from trajectories import assert_resumes_bit_for_bit

FP64 = torch.float64
CONV_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(
    b not in available_backends() or not hasattr(get_backend(b), "conv_step"),
    reason=f"backend {b} has no conv kernels here")) for b in ("reference", "cpu")]


# ---- the oracle against the math written out ---------------------------------------------------------------------

def _by_hand(x_pos, x_neg, target, w, b, stride, pad, cfg, classes):
    """The conv FF loss from scratch: per-image RMS/L2 by a loop, the convolution as unfold + matrix product, the
    goodness and losses as sums over explicit index sets."""
    def norm(x):
        out = []
        for img in x:
            if cfg.norm == "none":
                out.append(img)
            else:
                s = (img ** 2).sum()
                d = (s / img.numel()).sqrt() if cfg.norm == "rms" else s.sqrt()
                out.append(img / (d + cfg.norm_eps))
        return torch.stack(out)

    def layer(x):
        n, _, hh, ww = x.shape
        kh, kw = w.shape[2:]
        cols = F.unfold(norm(x), (kh, kw), padding=pad, stride=stride)            # (n, C*kh*kw, L)
        z = torch.einsum("ok,nkl->nol", w.reshape(w.shape[0], -1), cols)
        ho, wo = (hh + 2 * pad - kh) // stride + 1, (ww + 2 * pad - kw) // stride + 1
        z = z.reshape(n, w.shape[0], ho, wo) + (0 if b is None else b.view(1, -1, 1, 1))
        return torch.where(z > 0, z, torch.zeros_like(z))

    def good(h):
        a = h * h if cfg.goodness_power == 2 else h
        n, c, hh, ww = a.shape
        if cfg.goodness_over == "sample":
            sets = [[(i, ch, y, x) for ch in range(c) for y in range(hh) for x in range(ww)] for i in range(n)]
            shape = (n,)
        elif cfg.goodness_over == "location":
            sets = [[(i, ch, y, x) for ch in range(c)] for i in range(n) for y in range(hh) for x in range(ww)]
            shape = (n, hh, ww)
        else:
            per = c // classes
            sets = [[(i, ch, y, x) for ch in range(k * per, (k + 1) * per) for y in range(hh) for x in range(ww)]
                    for i in range(n) for k in range(classes)]
            shape = (n, classes)
        vals = torch.stack([sum(a[idx] for idx in s) / (1 if cfg.goodness == "sum" else len(s)) for s in sets])
        return vals.reshape(shape)

    gp = good(layer(x_pos))
    if cfg.loss == "competitive":
        logits = gp / cfg.temperature
        return sum(torch.logsumexp(logits[i], 0) - logits[i, target[i]] for i in range(len(target))) / len(target)
    gn = good(layer(x_neg))
    sp = lambda t: torch.logaddexp(t, torch.zeros_like(t))  # noqa: E731
    if cfg.loss == "hinton":
        return (sp(cfg.threshold - gp).sum() + sp(gn - cfg.threshold).sum()) / (2 * gp.numel())
    if cfg.loss == "scff":  # theta+ = threshold, theta- = threshold_neg, + lambda |g+| per pair of goodness values
        terms = sp(cfg.threshold - gp) + sp(gn - cfg.threshold_neg) + cfg.scff_lambda * gp.abs()
        return terms.sum() / (2 * gp.numel())
    return sp(-cfg.symba_alpha * (gp - gn)).mean()


ORACLE_CASES = [c for c in itertools.product(("hinton", "symba", "scff", "competitive"), ("sample", "location"),
                                              (1, 2), ("sum", "mean"), ("rms", "l2", "none"))
                if not (c[0] == "competitive" and c[1] == "location")]


@pytest.mark.parametrize("loss,over,power,good,norm", ORACLE_CASES)
def test_the_conv_oracle_is_the_math(loss, over, power, good, norm):
    """The oracle's loss equals the one by hand (1e-13), and its gradient the central differences of its loss (1e-7);
    float64, stride 2, padding 1."""
    g = torch.Generator().manual_seed(3)
    x_pos, x_neg = (torch.rand(3, 2, 7, 6, generator=g, dtype=FP64) for _ in range(2))
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=FP64) * 0.5
    b = torch.randn(4, generator=g, dtype=FP64) * 0.1
    comp = loss == "competitive"
    cfg = FFConfig(loss=loss, goodness_over="group" if comp else over, goodness_power=power, goodness=good,
                   norm=norm, threshold=0.7, temperature=0.5,
                   **(dict(threshold_neg=1.2, scff_lambda=0.3) if loss == "scff" else {}))
    target = torch.tensor([1, 0, 1]) if comp else None
    xn = None if comp else x_neg
    out = conv_grad(x_pos, xn, target, w, b, ConvGeometry((2, 2), (1, 1)), cfg, 2)
    geom = ConvGeometry((2, 2), (1, 1))
    f = lambda w_, b_: conv_objective(x_pos, xn, target, w_, b_, geom, cfg, 2).loss  # noqa: E731
    want = _by_hand(x_pos, xn, target, w, b, 2, 1, cfg, 2)
    assert abs(out.loss.item() - want.item()) <= 1e-13 * max(1.0, abs(want.item()))
    fd_w = central_difference(lambda t: f(t, b).item(), w)
    fd_b = central_difference(lambda t: f(w, t).item(), b)
    assert (out.grad_weight - fd_w).abs().max() <= 1e-7 * max(1.0, fd_w.abs().max().item())
    assert (out.grad_bias - fd_b).abs().max() <= 1e-7 * max(1.0, fd_b.abs().max().item())
    if comp:
        assert out.g_pos.shape == (3, 2) and out.h_neg is None and out.g_neg is None
    else:
        assert out.g_pos.shape == ((3,) if over == "sample" else (3, 4, 3))


# ---- nn.Conv2d drop-in -------------------------------------------------------------------------------------------

def test_ffconv2d_takes_nn_conv2d_positional_arguments_and_initialization():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, 2, 1, 1, 1, True, "zeros", None, torch.float64)
    torch.manual_seed(0)
    ff = FFConv2d(3, 8, 3, 2, 1, 1, 1, True, "zeros", None, torch.float64)
    assert torch.equal(ff.weight, conv.weight) and torch.equal(ff.bias, conv.bias)
    x = torch.randn(2, 3, 9, 7, dtype=FP64)
    xn = x / (x.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1) + 1e-8)
    torch.testing.assert_close(ff(x), F.relu(conv(xn)), rtol=0, atol=1e-14)
    assert ff(x).requires_grad  # differentiable like nn.Conv2d + ReLU
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, True, None, FP64)
    torch.manual_seed(0)
    fl = FFLinear(5, 4, True, None, FP64)  # nn.Linear's positional (in, out, bias, device, dtype)
    assert torch.equal(fl.weight, lin.weight) and torch.equal(fl.bias, lin.bias)


def test_from_conv_and_an_nn_conv2d_state_dict():
    conv = nn.Conv2d(2, 4, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2)
    ff = FFConv2d.from_conv(conv, lr=0.01)
    assert ff.geometry == ConvGeometry((1, 2), (1, 2), (2, 1), 2) and torch.equal(ff.weight, conv.weight)
    other = FFConv2d(2, 4, (3, 5), (1, 2), (1, 2), (2, 1), 2)
    other.ff_step(torch.rand(2, 2, 9, 9), torch.rand(2, 2, 9, 9))
    other.load_state_dict(conv.state_dict())  # nn.Conv2d keys: new weights, fresh optimizer state
    assert torch.equal(other.weight, conv.weight) and other.step_count == 0
    assert all(getattr(other, n).abs().sum() == 0 for n in other._state_buffer_names())
    same = FFConv2d(4, 4, 3, padding="same")
    assert same.padding == (1, 1) and same(torch.rand(1, 4, 5, 6)).shape == (1, 4, 5, 6)
    with pytest.raises(ValueError, match="same"):
        FFConv2d(4, 4, 2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        FFConv2d(4, 4, 3, padding_mode="reflect")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_fflinear_competitive_is_the_1x1_convolution(backend):
    torch.manual_seed(1)
    lin = FFLinear(6, 8, loss="competitive", num_classes=4, goodness="mean", temperature=0.3, lr=1e-3, backend=backend,
                   dtype=FP64)
    conv = FFConv2d(6, 8, 1, loss="competitive", num_classes=4, temperature=0.3, backend=backend, dtype=FP64)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(8, 6, 1, 1))
        conv.bias.copy_(lin.bias)
    for step in range(3):
        x = torch.rand(5, 6, dtype=FP64)
        y = torch.tensor([0, 3, 1, 2, 3])
        a = lin.ff_step_competitive(x, y)
        c = conv.ff_step_competitive(x.view(5, 6, 1, 1), y)
        assert torch.equal(a.loss, c.loss) and torch.equal(a.g_pos, c.g_pos) and a.h_neg is None
        assert torch.equal(lin.weight, conv.weight.view(8, 6)) and torch.equal(lin.bias, conv.bias)
    assert lin.goodness(x).shape == (5, 4)
    with pytest.raises(ValueError, match="ff_step_competitive"):
        lin.ff_step(x, x)


# ---- the container ------------------------------------------------------------------------------------------------

def _cnn(backend, dtype=FP64, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(loss="competitive", num_classes=2, backend=backend, dtype=dtype, temperature=0.5, lr=1e-3,
                goodness="mean", **kw)
    return FFNet(modules=[FFConv2d(1, 4, 3, padding=1, **opts), nn.MaxPool2d(2),
                          FFConv2d(4, 6, 3, padding=1, groups=2, **opts), nn.AvgPool2d(2), nn.Flatten(),
                          FFLinear(6 * 2 * 2, 4, **opts)])


def _batches(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(3, 1, 9, 8, generator=g, dtype=FP64), torch.randint(0, 2, (3,), generator=g))
            for _ in range(n)]


def _plain_loop(net, batches):
    """The same training written with plain autograd: one torch.optim.Adam per layer, each layer's loss from its own
    input (detached), the pooling and flatten between them by torch.nn.functional."""
    params = [[m.weight.detach().clone().requires_grad_(True), m.bias.detach().clone().requires_grad_(True)]
              for m in net.layers]
    opts = [torch.optim.Adam(p, lr=1e-3) for p in params]

    def norm(x):
        return x / (x.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (x.dim() - 1)) + 1e-8)

    for x, y in batches:
        h = x
        for i, ((w, b), opt) in enumerate(zip(params, opts)):
            opt.zero_grad()
            z = F.conv2d(norm(h), w, b, padding=1, groups=1 + (i == 1)) if i < 2 else F.linear(norm(h), w, b)
            a = F.relu(z)
            g = a.pow(2).reshape(len(y), 2, -1).mean(-1)
            F.cross_entropy(g / 0.5, y).backward()
            opt.step()
            h = a.detach()
            h = F.max_pool2d(h, 2) if i == 0 else F.avg_pool2d(h, 2).flatten(1) if i == 1 else h
    return params


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_a_conv_net_trains_as_a_plain_autograd_loop(backend):
    net = _cnn(backend)
    batches = _batches()
    want = _plain_loop(net, batches)
    for x, y in batches:
        out = net.ff_step_competitive(x, y)
        assert out.losses.shape == (3,)
    for layer, (w, b) in zip(net.layers, want):
        torch.testing.assert_close(layer.weight, w.detach(), rtol=0, atol=1e-11)
        torch.testing.assert_close(layer.bias, b.detach(), rtol=0, atol=1e-11)
        assert layer.step_count == len(batches)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_a_conv_net_resumes_bit_for_bit(backend):
    assert_resumes_bit_for_bit(lambda seed: _cnn(backend, torch.float32, seed=seed), _batches(6),
                               lambda net, b: net.ff_step_competitive(b[0].float(), b[1]))


@pytest.mark.parametrize("backend", CONV_BACKENDS[1:])  # the reference reads each layer's loss by design
def test_a_conv_net_step_reads_the_host_once(backend):
    net = _cnn(backend)
    x, y = _batches(1)[0]
    net.ff_step_competitive(x, y)
    with count_syncs() as calls:
        net.ff_step_competitive(x, y)
    assert len(calls) == 1, calls


def test_predict_sums_the_class_groups_goodness_in_one_pass():
    net = _cnn("reference")
    x, y = _batches(1)[0]
    hs = net.features(x)
    want = sum(layer.goodness_of(h) for layer, h in zip(net.layers, hs))
    torch.testing.assert_close(net.goodness_scores(x, 2), want, rtol=0, atol=0)
    assert torch.equal(net.predict(x, 2), want.argmax(-1))
    assert net.predict(x, 2, method="goodness").shape == (3,)
    with pytest.raises(ValueError, match="num_classes"):
        net.predict(x, 3)


# ---- non-finite and bad input -------------------------------------------------------------------------------------

def _snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(net, before, layers=None):
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor) and (layers is None or any(k.startswith(f"layers.{i}.") for i in layers)):
            assert torch.equal(v, before[k]), k


def changed_layers(net, before) -> list:
    """The indices (as str) of the layers whose state_dict tensors differ from the snapshot ``before``."""
    return sorted({k.split(".")[1] for k, v in net.state_dict().items()
                   if isinstance(v, torch.Tensor) and not torch.equal(v, before[k])})


def assert_the_non_finite_rule(net, x, y):
    """A NaN image: layer 0's loss is not finite and nothing changes; an inf weight in layer 1: layer 0 steps, layer 1
    and those after it stay as they were (every state_dict tensor)."""
    before = _snapshot(net)
    bad = x.clone()
    bad[1, 0, 2, 3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="layer 0"):
        net.ff_step_competitive(bad, y)
    assert changed_layers(net, before) == []
    assert all(m.step_count == 0 for m in net.layers)
    with torch.no_grad():
        net.layers[1].weight[0, 0, 0, 0] = float("inf")
    before = _snapshot(net)
    with pytest.raises(NonFiniteLossError, match="layer 1"):
        net.ff_step_competitive(x, y)
    assert changed_layers(net, before) == ["0"]
    assert [m.step_count for m in net.layers] == [1] + [0] * (len(net.layers) - 1)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_non_finite_steps_change_nothing_from_the_failing_layer_on(backend):
    assert_the_non_finite_rule(_cnn(backend), *_batches(1)[0])


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_bad_input_raises_and_changes_nothing(backend):
    net = _cnn(backend)
    layer = net.layers[0]
    x, y = _batches(1)[0]
    before = _snapshot(net)
    cases = [
        (lambda: net.ff_step_competitive(x, torch.tensor([0, 2, 1])), ValueError, r"\[0, 2\)"),
        (lambda: layer.ff_step_competitive(x, torch.tensor([0, -1, 1])), ValueError, r"\[0, 2\)"),
        (lambda: layer.ff_step_competitive(x, torch.tensor([0.0, 1.0, 1.0])), TypeError, "integer"),
        (lambda: layer.ff_step_competitive(x, torch.tensor([0, 1])), ValueError, "shape"),
        (lambda: layer.ff_step_competitive(x[0], y), ValueError, "4-D"),
        (lambda: layer.ff_step_competitive(torch.rand(3, 2, 9, 8, dtype=FP64), y), ValueError, "channels"),
        (lambda: layer.ff_step_competitive(torch.rand(3, 1, 1, 1, dtype=FP64)[:, :, :0], y), ValueError, "larger"),
        (lambda: layer.ff_step_competitive(x.float(), y), TypeError, "dtype"),
        (lambda: layer.ff_step(x, x), ValueError, "ff_step_competitive"),
        (lambda: net.ff_step(x, x), ValueError, "competitive"),
        (lambda: layer.ff_grad(x, x), ValueError, "negatives"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
        _unchanged(net, before)
    assert all(m.step_count == 0 for m in net.layers)


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of"):
        FFConv2d(1, 6, 3, loss="competitive", num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        FFConv2d(1, 8, 3, loss="competitive")
    with pytest.raises(ValueError, match="num_classes is for"):
        FFConv2d(1, 8, 3, num_classes=4)
    with pytest.raises(ValueError, match="peer"):
        FFConv2d(1, 8, 3).configure(peer_norm=0.1)
    with pytest.raises(ValueError, match="location"):
        FFLinear(4, 4, loss="hinton").configure(goodness_over="location")
    with pytest.raises(ValueError, match="parameters"):
        FFNet(modules=[FFConv2d(1, 4, 3), nn.BatchNorm2d(4), FFConv2d(4, 4, 3)])
    with pytest.raises(ValueError, match="every layer"):
        FFNet(modules=[FFConv2d(1, 4, 3, loss="competitive", num_classes=2), FFConv2d(4, 4, 3)])
    with pytest.raises(ValueError, match="first module"):
        FFNet(modules=[nn.MaxPool2d(2), FFConv2d(1, 4, 3)])
    with pytest.raises(ValueError, match="not both"):
        FFNet([4, 4], modules=[FFLinear(4, 4)])
    assert "FFConv2d" in repr(ffkernels.FFNet(modules=[FFConv2d(1, 4, 3)]))


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_the_split_step_is_the_fused_step(backend):
    """ff_grad then ff_update (e.g. after an all-reduce) trains a conv layer bit for bit as ff_step_competitive."""
    torch.manual_seed(0)
    a = FFConv2d(2, 4, 3, loss="competitive", num_classes=2, backend=backend, dtype=FP64)
    b = FFConv2d(2, 4, 3, loss="competitive", num_classes=2, backend=backend, dtype=FP64)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.rand(3, 2, 6, 6, generator=g, dtype=FP64), torch.randint(0, 2, (3,), generator=g)
        grad = a.ff_grad(x, target=y)
        a.ff_update(grad.grad_weight, grad.grad_bias, grad.loss)
        b.ff_step_competitive(x, y)
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b.state_dict()[k]), k
    assert a.step_count == b.step_count == 3


@pytest.mark.parametrize("backend", CONV_BACKENDS[1:])
def test_the_conv_step_op_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True, aot_eager) traces ff_conv_step through its fake and declared mutations: the
    compiled step gives the eager step's outputs and in-place update bit for bit."""
    torch.manual_seed(0)
    cfg = FFConfig(loss="competitive", goodness_over="group", goodness="mean", temperature=0.5)
    w, b = torch.randn(4, 2, 3, 3) * 0.3, torch.randn(4) * 0.1
    x, y = torch.rand(3, 2, 7, 6), torch.tensor([1, 0, 1])
    states = [torch.zeros_like(t) for t in (w, w, b, b)]

    def train(x, y, w, b, s1w, s2w, s1b, s2b):
        out = torch.ops.ffkernels.ff_conv_step(x, None, y, w, b, s1w, s2w, s1b, s2b, [1, 1], [1, 1], [1, 1], 1, 2, 1,
                                               cfg.conv_op_options)
        return out[0] * 2.0, out[3].sum(-1)

    eager = [t.clone() for t in (w, b, *states)]
    compiled = [t.clone() for t in (w, b, *states)]
    want = train(x, y, *eager)
    got = torch.compile(train, fullgraph=True, backend="aot_eager")(x, y, *compiled)
    assert not torch.equal(compiled[0], w), "the in-place update did not happen"
    for a, e in zip(list(got) + compiled, list(want) + eager):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_channels_last_and_strided_inputs_are_accepted(backend):
    """Inputs in any memory format or strides train exactly as their contiguous copy (the layer makes them
    contiguous)."""
    x, y = _batches(1)[0]
    nets = [_cnn(backend) for _ in range(3)]
    wide = torch.zeros(3, 1, 9, 16, dtype=FP64)
    wide[..., ::2] = x
    inputs = [x, x.to(memory_format=torch.channels_last), wide[..., ::2]]
    assert not inputs[2].is_contiguous()
    for net, xin in zip(nets, inputs):
        net.ff_step_competitive(xin, y)
    for net in nets[1:]:
        for a, b in zip(net.parameters(), nets[0].parameters()):
            assert torch.equal(a, b)


def test_dropout_between_layers_trains_in_train_mode_and_predicts_in_eval_mode():
    from ffkernels.training import accuracy
    torch.manual_seed(0)
    opts = dict(loss="competitive", num_classes=2, backend="reference", dtype=FP64)
    net = FFNet(modules=[FFConv2d(1, 4, 3, padding=1, **opts), nn.Dropout(0.5), FFConv2d(4, 4, 3, **opts)])
    x, y = _batches(1)[0]
    a = net.features(x)[1]
    b = net.features(x)[1]
    assert not torch.equal(a, b)  # train mode: dropout draws
    accs = [accuracy(net, x.flatten(1), y, 2, shape=(1, 9, 8)) for _ in range(2)]
    assert accs[0] == accs[1] and net.training  # eval mode inside, train mode restored
