"""FFConvBlock2d, the BatchNorm block (docs/design.md, "The BatchNorm block"): an FFNet of blocks against the same
training written with nn.Conv2d, nn.BatchNorm2d and torch.optim (fp64, several steps, both optimizers, odd shapes),
prediction with the running statistics, resume, one host sync per step, the non-finite rule and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backends import CUDA_BACKEND
from ffkernels import FFConvBlock2d, FFNet
from ffkernels.backends import available_backends
from test_conv_layer import assert_the_non_finite_rule, changed_layers
from test_host_syncs import count_syncs, syncs_of
from trajectories import assert_resumes_bit_for_bit

FP64 = torch.float64
# the block's gradient is torch ops on every backend; the update is the backend's (torch.optim, or the fused op)
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(), reason=f"no {b} backend here"))
            for b in ("reference", "cpu")]
OPTIMIZERS = {"adam": {"optimizer": "adam", "lr": 1e-2},
              "sgd": {"optimizer": "sgd", "lr": 5e-2, "momentum": 0.9, "weight_decay": 1e-2}}
TAU = 0.5


def _net(backend, dtype=FP64, seed=0, optim="adam", bias=True, device="cpu"):
    torch.manual_seed(seed)
    opts = dict(loss="competitive", num_classes=2, temperature=TAU, backend=backend, dtype=dtype, bias=bias,
                device=device, **OPTIMIZERS[optim])
    return FFNet(modules=[FFConvBlock2d(1, 4, 3, padding=1, pool=2, **opts),
                          FFConvBlock2d(4, 6, 3, padding=1, groups=2, pool=1, bn_momentum=0.3, **opts),
                          FFConvBlock2d(6, 4, 2, stride=2, pool=1, norm="rms", **opts)])


def _batches(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 1, 9, 11, generator=g, dtype=FP64), torch.randint(0, 2, (5,), generator=g))
            for _ in range(n)]


class _PlainBlock(nn.Module):
    """One block written with torch.nn: the convolution, ReLU, max-pooling and nn.BatchNorm2d."""

    def __init__(self, layer):
        super().__init__()
        self.conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              groups=layer.groups, bias=layer.bias is not None, dtype=FP64)
        self.bn = nn.BatchNorm2d(layer.out_channels, eps=layer.bn_eps, momentum=layer.bn_momentum, dtype=FP64)
        self.pool, self.rms = layer.pool, layer.config.norm == "rms"
        with torch.no_grad():
            self.conv.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.conv.bias.copy_(layer.bias)

    def forward(self, x):
        if self.rms:
            x = x / (x.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1) + 1e-8)
        h = F.relu(self.conv(x))
        return self.bn(F.max_pool2d(h, self.pool) if self.pool > 1 else h)


def _make_optimizer(params, optim):
    o = dict(OPTIMIZERS[optim])
    kind = o.pop("optimizer")
    return torch.optim.Adam(params, **o) if kind == "adam" else torch.optim.SGD(params, **o)


def _group_goodness(y):
    return y.pow(2).reshape(len(y), 2, -1).mean(-1)


def _plain_loop(net, batches, optim):
    """The same training with plain autograd: one torch.optim optimizer per block over its four parameters, each
    block's loss from its own (detached) input."""
    blocks = [_PlainBlock(layer) for layer in net.layers]
    opts = [_make_optimizer(b.parameters(), optim) for b in blocks]
    for x, y in batches:
        h = x
        for block, opt in zip(blocks, opts):
            opt.zero_grad()
            out = block(h)
            F.cross_entropy(_group_goodness(out) / TAU, y).backward()
            opt.step()
            h = out.detach()
    return blocks


def _assert_same(layer, block, atol):
    pairs = [(layer.weight, block.conv.weight), (layer.bn_weight, block.bn.weight), (layer.bn_bias, block.bn.bias),
             (layer.running_mean, block.bn.running_mean), (layer.running_var, block.bn.running_var)]
    if layer.bias is not None:
        pairs.append((layer.bias, block.conv.bias))
    for got, want in pairs:
        torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=atol)
    assert int(layer.num_batches_tracked) == int(block.bn.num_batches_tracked)


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_net_trains_as_a_plain_autograd_loop(backend, optim):
    net = _net(backend, optim=optim, bias=optim == "adam")
    batches = _batches()
    blocks = _plain_loop(net, batches, optim)
    for x, y in batches:
        out = net.ff_step_competitive(x, y)
        assert out.losses.shape == (3,)
    # reference: torch.optim itself, so only the ops' rounding differs. cpu: the fused update rounds differently from
    # torch.optim in the last bits, and the conv bias in front of the BatchNorm has a near-zero gradient (the
    # BatchNorm removes a channel's shift wherever the ReLU passes it), which Adam divides by its own size: those last
    # bits come out at up to ~1e-11 there (measured), not at ~1e-13 as elsewhere. A wrong term is off by far more.
    atol = 1e-11 if backend == "reference" else 1e-9
    for layer, block in zip(net.layers, blocks):
        _assert_same(layer, block, atol)
        assert layer.step_count == len(batches)
    # prediction in eval mode reads the running statistics, as the plain blocks' eval mode
    x = batches[0][0]
    net.eval()
    want, h = 0, x
    for block in blocks:
        block.eval()
        h = block(h)
        want = want + _group_goodness(h)
    torch.testing.assert_close(net.goodness_scores(x, 2, layers=[0, 1, 2]), want.detach(), rtol=0, atol=atol)
    assert torch.equal(net.predict(x, 2, layers=[0, 1, 2]), want.argmax(-1))


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=CUDA_BACKEND.marks)])
def test_on_cuda_tensors_a_block_net_trains_as_the_plain_loop(backend, optim):
    """The block's torch ops on the GPU and the cuda backend's fused update, against the plain loop on the CPU
    (fp64), and still one host read per net step."""
    net = _net(backend, optim=optim, bias=optim == "adam", device="cuda")
    batches = _batches()
    blocks = _plain_loop(net, batches, optim)
    for x, y in batches[:-1]:
        net.ff_step_competitive(x.cuda(), y.cuda())
    x, y = (t.cuda() for t in batches[-1])
    n, calls = syncs_of(lambda: net.ff_step_competitive(x, y))
    assert n == 1, calls
    for layer, block in zip(net.cpu().layers, blocks):
        _assert_same(layer, block, 1e-9)


def test_the_step_returns_the_batchnorm_output_and_its_goodness():
    net = _net("reference")
    x, y = _batches(1)[0]
    first = net.layers[0]
    want = first(x)  # training mode: the batch's statistics, as the step
    out = net.ff_step_competitive(x, y, return_outputs=True).outputs[0]
    torch.testing.assert_close(out.h_pos, want.detach(), rtol=0, atol=1e-12)
    assert out.h_pos.shape == (5, 4, 4, 5)  # 9x11 pooled by 2
    torch.testing.assert_close(out.g_pos, _group_goodness(want).detach(), rtol=0, atol=1e-12)
    assert out.h_neg is None and out.g_neg is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_net_resumes_bit_for_bit(backend):
    state = assert_resumes_bit_for_bit(lambda seed: _net(backend, torch.float32, seed=seed), _batches(6),
                                       lambda net, b: net.ff_step_competitive(b[0].float(), b[1]))
    assert "layers.0.running_var" in state and "layers.0.exp_avg_sq_bn_weight" in state


@pytest.mark.skipif("cpu" not in available_backends(), reason="no cpu backend here")
def test_a_block_net_step_reads_the_host_once():
    net = _net("cpu")  # the reference backend's torch.optim update reads each loss by design
    x, y = _batches(1)[0]
    net.ff_step_competitive(x, y)
    with count_syncs() as calls:
        net.ff_step_competitive(x, y)
    assert len(calls) == 1, calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_steps_change_nothing_from_the_failing_layer_on(backend):
    assert_the_non_finite_rule(_net(backend), *_batches(1)[0])  # the running statistics included


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_and_changes_nothing(backend):
    net = _net(backend)
    layer = net.layers[0]
    x, y = _batches(1)[0]
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    cases = [
        (lambda: net.ff_step_competitive(x, torch.tensor([0, 2, 1, 0, 0])), ValueError, r"\[0, 2\)"),
        (lambda: layer.ff_step_competitive(x, torch.tensor([0, -1, 1, 0, 0])), ValueError, r"\[0, 2\)"),
        (lambda: layer.ff_step_competitive(x, y.float()), TypeError, "integer"),
        (lambda: layer.ff_step_competitive(x[0], y), ValueError, "4-D"),
        (lambda: layer.ff_step_competitive(x[:, :, :1, :1], y), ValueError, "below 1x1"),
        (lambda: layer.ff_step_competitive(x[:1, :, :2, :2], y[:1]), ValueError, "more than one value per channel"),
        (lambda: layer.ff_step_competitive(x.float(), y), TypeError, "dtype"),
        (lambda: layer.ff_step(x, x), ValueError, "ff_step_competitive"),
        (lambda: layer.ff_grad(x, target=y), NotImplementedError, "split"),
        (lambda: layer.ff_update(layer.weight, layer.bias), NotImplementedError, "split"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
        assert changed_layers(net, before) == []
    assert all(m.step_count == 0 for m in net.layers)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "hinton"}, "competitive"),
    ({"num_classes": None}, "num_classes"),
    ({"goodness_over": "sample"}, "group"),
    ({"pool": 0}, "pool"),
    ({"pool": True}, "pool"),
    ({"bn_eps": 0.0}, "bn_eps"),
    ({"bn_momentum": 1.5}, "bn_momentum"),
])
def test_bad_construction(kwargs, match):
    opts = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        FFConvBlock2d(1, 4, 3, **opts)


@pytest.mark.skipif("cpu" not in available_backends(), reason="no cpu backend here")
def test_under_bf16_autocast_the_convolution_runs_in_bf16_on_every_backend_alike():
    """The block's gradient is the same torch ops on every backend: under autocast the cpu and reference backends
    take the same steps (the update's rounding apart), and they differ from the fp32 steps."""
    x, y = (t[0] for t in zip(*_batches(1)))
    nets = {b: _net(b, torch.float32) for b in ("reference", "cpu")}
    fp32 = _net("cpu", torch.float32)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = {b: n.ff_step_competitive(x.float(), y).losses for b, n in nets.items()}
        plain = fp32.ff_step_competitive(x.float(), y).losses
    torch.testing.assert_close(losses["cpu"], losses["reference"], rtol=0, atol=1e-5)
    assert (losses["cpu"] - plain).abs().max() > 1e-5
    for a, b in zip(nets["cpu"].parameters(), nets["reference"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
