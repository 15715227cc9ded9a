"""FFLinear as a drop-in nn.Linear (+ReLU), its state_dict, and FFNet. (Resuming from a state_dict:
test_resume.py; the split step: test_split_step.py.)"""
import copy

import pytest
import torch
from torch import nn

import ffkernels
from ffkernels import FFLinear, FFNet
from oracle import layer_forward


def test_same_init_as_nn_linear():
    torch.manual_seed(3)
    lin = nn.Linear(37, 11)
    torch.manual_seed(3)
    ff = FFLinear(37, 11)
    assert torch.equal(lin.weight, ff.weight) and torch.equal(lin.bias, ff.bias)
    assert ff.weight.shape == (11, 37) and ff.in_features == 37 and ff.out_features == 11


def test_loads_nn_linear_state_dict_strict():
    lin = nn.Linear(20, 5)
    ff = FFLinear(20, 5)
    ff.ff_step(torch.randn(4, 20), torch.randn(4, 20))
    ff.load_state_dict(lin.state_dict())  # strict: optimizer state is optional
    assert torch.equal(ff.weight, lin.weight) and torch.equal(ff.bias, lin.bias)
    assert ff.step_count == 0 and float(ff.exp_avg_weight.abs().sum()) == 0.0


def test_nn_linear_loads_ff_weights_non_strict():
    ff = FFLinear(20, 5)
    lin = nn.Linear(20, 5)
    res = lin.load_state_dict(ff.state_dict(), strict=False)
    assert not res.missing_keys and torch.equal(lin.weight, ff.weight)


def test_from_linear_and_forward_matches_linear_relu():
    lin = nn.Linear(9, 4, dtype=torch.float64)
    ff = FFLinear.from_linear(lin, norm="none")
    x = torch.randn(3, 9, dtype=torch.float64)
    torch.testing.assert_close(ff(x), torch.relu(lin(x)))
    assert ff.weight.dtype == torch.float64 and ff.weight is not lin.weight


def test_works_in_sequential_and_is_differentiable():
    model = nn.Sequential(FFLinear(6, 8, dtype=torch.float64), FFLinear(8, 3, dtype=torch.float64),
                          nn.Linear(3, 2, dtype=torch.float64))
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    assert model[0].weight.grad is not None and x.grad is not None
    f = model[0]
    assert torch.autograd.gradcheck(lambda x, w, b: layer_forward(x, w, b, "rms", 1e-8),
                                    (torch.randn(3, 6, dtype=torch.float64, requires_grad=True),
                                     f.weight.detach().clone().requires_grad_(), f.bias.detach().clone().requires_grad_()))


def test_leading_dims_are_flattened(backend):
    torch.manual_seed(0)
    ff = FFLinear(6, 4, backend=backend.name, device=backend.device)
    twin = copy.deepcopy(ff)
    xp, xn = torch.randn(2, 3, 6).to(backend.device), torch.randn(2, 3, 6).to(backend.device)
    out, flat = ff.ff_step(xp, xn), twin.ff_step(xp.reshape(6, 6), xn.reshape(6, 6))
    assert out.h_pos.shape == (2, 3, 4) and out.g_neg.shape == (2, 3)
    for field, a, b in zip(out._fields, out, flat):
        assert torch.equal(a.reshape(b.shape), b), field
    g = ff.ff_grad(xp, xn)
    assert g.h_neg.shape == (2, 3, 4) and g.g_pos.shape == (2, 3) and g.grad_weight.shape == (4, 6)


def test_threshold_defaults():
    assert FFLinear(5, 7).config.threshold == 7.0
    assert FFLinear(5, 7, goodness="mean").config.threshold == 1.0
    assert FFLinear(5, 7, threshold=2.5).config.threshold == 2.5


def test_state_dict_rejects_other_optimizer():
    sd = FFLinear(4, 3, optimizer="adam").state_dict()
    with pytest.raises((ValueError, RuntimeError), match="optimizer"):
        FFLinear(4, 3, optimizer="sgd").load_state_dict(sd)


def test_cast_keeps_optimizer_state_fp32():
    ff = FFLinear(4, 3).to(torch.bfloat16)
    assert ff.weight.dtype == torch.bfloat16 and ff.exp_avg_weight.dtype == torch.float32
    ff = ff.double()
    assert ff.exp_avg_weight.dtype == torch.float64


def test_configure_changes_lr_and_resets_state_on_new_optimizer():
    ff = FFLinear(4, 3)
    ff.ff_step(torch.randn(2, 4), torch.randn(2, 4))
    ff.configure(lr=1e-4)
    assert ff.config.lr == 1e-4 and ff.step_count == 1
    ff.configure(optimizer="sgd", momentum=0.5)
    assert ff.step_count == 0 and hasattr(ff, "momentum_buffer_weight") and not hasattr(ff, "exp_avg_weight")


def test_ffnet_step_is_a_layer_by_layer_sweep():
    torch.manual_seed(0)
    net = FFNet([12, 9, 7, 5])
    layers = copy.deepcopy(net.layers)
    xp, xn = torch.randn(4, 12), torch.randn(4, 12)
    out = net.ff_step(xp, xn, return_outputs=True)
    for i, layer in enumerate(layers):
        o = layer.ff_step(xp, xn)
        torch.testing.assert_close(out.losses[i], o.loss)
        xp, xn = o.h_pos, o.h_neg
        torch.testing.assert_close(net.layers[i].weight, layer.weight, rtol=0, atol=0)
    assert out.losses.shape == (3,) and len(out.outputs) == 3


def test_ffnet_predict_and_goodness():
    net = FFNet([20, 16, 16, 16])
    assert net.predict_layers == [1, 2]
    x = torch.rand(7, 20)
    assert net.goodness(x).shape == (7, 3)
    pred = net.predict(x, num_classes=10, batch_size=3)
    assert pred.shape == (7,) and pred.dtype == torch.int64 and int(pred.max()) < 10
    # predict agrees with an explicit loop over labels
    scores = torch.stack([net.goodness(ffkernels.embed_label(x, torch.full((7,), c), 10))[:, 1:].sum(-1)
                          for c in range(10)])
    assert torch.equal(pred, scores.argmax(0))


def test_labels_helpers():
    y = torch.randint(0, 10, (1000,))
    w = ffkernels.wrong_labels(y, 10, torch.Generator().manual_seed(0))
    assert bool((w != y).all()) and int(w.min()) >= 0 and int(w.max()) <= 9
    assert len(torch.unique(w)) == 10  # every wrong class is drawn
    x = torch.rand(1000, 784)
    xl = ffkernels.embed_label(x, y, 10)
    assert torch.equal(xl[:, :10].argmax(1), y) and torch.equal(xl[:, 10:], x[:, 10:])
    assert torch.equal(xl[:, :10].sum(1), torch.ones(1000))
    assert torch.allclose(ffkernels.embed_neutral(x, 10)[:, :10], torch.full((1000, 10), 0.1))
    with pytest.raises(TypeError, match="integer"):  # 2.7 is no class: refused, not embedded as class 2
        ffkernels.embed_label(x[:3], torch.tensor([0.0, 1.0, 2.7]), 10)
