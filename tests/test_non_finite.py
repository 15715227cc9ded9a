"""A step whose loss is not finite changes nothing, on every backend: the ops skip the update on the device (no
host sync) and return the loss; FFLinear/FFNet then raise NonFiniteLossError. With peer normalization its running
mean r stays as it was too, also when only the peer term is not finite (an infinite r)."""
import pytest
import torch

import ffkernels
from backends import backend_dtype_params, backend_params
from ffkernels import FFLinear, FFNet, NonFiniteLossError


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_unchanged(layer, before):
    for k, v in _snapshot(layer).items():
        assert torch.equal(v, before[k]), k


PEER = dict(peer_norm=0.5, peer_momentum=0.8)
HOWS = [pytest.param(how, peer, id=how + ("-peer" if peer else "")) for peer in (False, True)
        for how in ["nan-input", "inf-input", "overflow"] + (["inf-in-r"] if peer else [])]


# numpy under the Triton interpreter, making the inf/nan on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("how,peer", HOWS)
@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_step_with_non_finite_loss_changes_nothing(backend, dtype, optimizer, how, peer):
    opt = dict(optimizer="adam") if optimizer == "adam" else dict(optimizer="sgd", momentum=0.9, lr=0.1)
    torch.manual_seed(0)
    layer = FFLinear(16, 8, backend=backend.name, device=backend.device, dtype=dtype,
                     norm="none" if how == "overflow" else "rms", **opt, **(PEER if peer else {}))
    x_pos, x_neg = (torch.randn(4, 16, dtype=dtype).to(backend.device) for _ in range(2))
    layer.ff_step(x_pos, x_neg)  # a finite step first: non-zero optimizer state (and r)
    r = layer.peer_mean if peer else None
    assert r is None or r.abs().max() > 0
    if how == "nan-input":
        x_neg[2, 3] = float("nan")
    elif how == "inf-input":
        x_pos[0, 0] = float("inf")
    elif how == "overflow":  # finite input whose goodness overflows (no normalization)
        x_neg[2] = 10 * torch.finfo(dtype).max ** 0.5
    else:  # the FF loss is finite; r' has an inf, so L_peer = inf - inf = NaN: only the peer term
        r[1] = float("inf")
    before, steps = _snapshot(layer), layer.step_count
    # the op: returns the loss, updates nothing
    out = ffkernels.ff_step(x_pos, x_neg, layer.weight, layer.bias, layer._states("weight"), layer._states("bias"),
                            steps + 1, layer.config, peer_mean=r, backend=backend.name)
    assert not torch.isfinite(out.loss)
    _assert_unchanged(layer, before)
    # the module: raises, and changes nothing either
    with pytest.raises(NonFiniteLossError, match="not finite"):
        layer.ff_step(x_pos, x_neg)
    assert layer.step_count == steps
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("loss", ["nan", "inf", "-inf", "nan-float64", "inf-bfloat16"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_update_skipped_when_the_given_loss_is_not_finite(backend, dtype, loss):
    """ff_update(loss=...) skips the update for a non-finite loss of any dtype; an integer loss is finite."""
    value, _, loss_dtype = loss.partition("-float64" if "float64" in loss else "-bfloat16")
    loss_dtype = {"": dtype, "-float64": torch.float64, "-bfloat16": torch.bfloat16}[loss_dtype]
    cfg = ffkernels.FFConfig(optimizer="adam")
    w = torch.randn(5, 3, dtype=dtype).to(backend.device)
    b = torch.randn(5, dtype=dtype).to(backend.device)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st_w = tuple(torch.zeros_like(w, dtype=sdt) for _ in cfg.state_names)
    st_b = tuple(torch.zeros_like(b, dtype=sdt) for _ in cfg.state_names)
    before = [t.clone() for t in (w, b, *st_w, *st_b)]
    bad = torch.tensor(float(value), dtype=loss_dtype, device=backend.device)
    ffkernels.ff_update(w, b, torch.ones_like(w), torch.ones_like(b), st_w, st_b, 1, cfg, loss=bad,
                        backend=backend.name)
    for x, y in zip((w, b, *st_w, *st_b), before):
        assert torch.equal(x, y)
    ffkernels.ff_update(w, b, torch.ones_like(w), torch.ones_like(b), st_w, st_b, 1, cfg,
                        loss=torch.tensor(2, device=backend.device), backend=backend.name)
    assert not torch.equal(w, before[0]) and not torch.equal(st_w[1], before[3])


@pytest.mark.parametrize("peer", [False, True], ids=["plain", "peer"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_labeled_step_with_non_finite_loss_changes_nothing(backend, dtype, peer):
    dev = backend.device
    torch.manual_seed(0)
    layer = FFLinear(20, 6, backend=backend.name, device=dev, dtype=dtype, **(PEER if peer else {}))
    x = torch.randn(4, 20, dtype=dtype).to(dev)
    y_pos, y_neg = torch.tensor([0, 1, 2, 3], device=dev), torch.tensor([1, 2, 3, 0], device=dev)
    layer.ff_step_labeled(x, y_pos, y_neg, 4)
    before = _snapshot(layer)
    x[0, 13] = float("nan")
    with pytest.raises(NonFiniteLossError, match="not finite"):
        layer.ff_step_labeled(x, y_pos, y_neg, 4)
    assert layer.step_count == 1
    _assert_unchanged(layer, before)


def test_fflinear_ff_update_raises_for_a_non_finite_loss(backend):
    layer = FFLinear(8, 5, backend=backend.name, device=backend.device)
    before = _snapshot(layer)
    with pytest.raises(NonFiniteLossError, match="not finite"):
        layer.ff_update(torch.zeros(5, 8, device=backend.device), torch.zeros(5, device=backend.device),
                        loss=torch.tensor(float("nan")))
    assert layer.step_count == 0
    _assert_unchanged(layer, before)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", backend_params())
def test_ffnet_names_the_failing_layer(backend):
    xp = torch.full((2, 6), 1e30, device=backend.device)  # finite input whose goodness overflows in layer 0
    net = FFNet([6, 4, 4], norm="none", backend=backend.name, device=backend.device)
    with torch.no_grad():
        net.layers[0].weight.abs_()  # every unit active: h = 1e30 * sum(w) + b, h^2 = inf
    before = [_snapshot(layer) for layer in net.layers]
    with pytest.raises(NonFiniteLossError, match="layer 0"):
        net.ff_step(xp, xp)
    for layer, snap in zip(net.layers, before):
        _assert_unchanged(layer, snap)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("labeled", [False, True], ids=["ff_step", "ff_step_labeled-head"])
@pytest.mark.parametrize("backend", backend_params())
def test_ffnet_middle_layer_failure_leaves_it_and_the_later_layers(backend, labeled):
    """Layer 2 of 4 overflows (h finite, h^2 = inf): layers 0, 1 step; layers 2, 3 (whose RMS-normalized input is
    finite, so its own loss would be finite) and the head keep everything, peer_mean and step_count included. The
    sweep reads the losses once at the end: layer 3 is held back on the device (docs/design.md, "Host syncs")."""
    torch.manual_seed(0)
    dev = backend.device
    net = FFNet([20, 16, 16, 16, 16], backend=backend.name, device=dev, **PEER,
                **(dict(head=True, num_classes=4) if labeled else {}))
    x = torch.rand(6, 20).to(dev)
    y = torch.tensor([0, 1, 2, 3, 0, 1], device=dev)

    def step():
        if labeled:
            return net.ff_step_labeled(x, y, (y + 1) % 4, 4)
        return net.ff_step(x, x.flip(0))

    step()
    with torch.no_grad():
        net.layers[2].weight.abs_().mul_(1e30)
    before = [_snapshot(layer) for layer in net.layers]
    head_before = _snapshot(net.head) if labeled else None
    with pytest.raises(NonFiniteLossError, match=r"layer 2: .*not finite.*layers 0\.\.1 were updated"):
        step()
    assert [layer.step_count for layer in net.layers] == [2, 2, 1, 1]
    for i, layer in enumerate(net.layers):
        if i < 2:
            assert not torch.equal(layer.weight, before[i]["weight"])
            assert not torch.equal(layer.peer_mean, before[i]["peer_mean"])
        else:
            _assert_unchanged(layer, before[i])
    if labeled:
        _assert_unchanged(net.head, head_before)
        assert net.head.step_count == 1


@pytest.mark.parametrize("backend", backend_params())
def test_ffnet_bad_labels_on_the_pair_path_change_nothing(backend):
    """The pair is built without reading the labels on the host; out-of-range labels are found by the step's one
    host check, which raises ValueError with nothing updated (the first layer's input was made NaN on the device)."""
    torch.manual_seed(0)
    dev = backend.device
    net = FFNet([20, 16, 16], backend=backend.name, device=dev, **PEER, head=True, num_classes=4)
    x = torch.rand(3, 20).to(dev)
    before = [_snapshot(m) for m in (*net.layers, net.head)]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[0, 7\]"):
        net.ff_step_labeled(x, torch.tensor([0, 1, 7], device=dev), torch.tensor([1, 2, 3], device=dev), 4,
                            first_layer="pair")
    for m, snap in zip((*net.layers, net.head), before):
        _assert_unchanged(m, snap)
        assert m.step_count == 0
