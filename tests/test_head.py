"""FFNet's softmax head: its math, its isolation from the FF layers, its state, one-pass prediction."""
import copy

import pytest
import torch

from ffkernels import FFNet, NonFiniteLossError, SoftmaxHead, embed_neutral
from ffkernels.training import accuracy


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def _data(n=16, k=30, c=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("opt", [dict(optimizer="adam", weight_decay=0.01), dict(optimizer="sgd", momentum=0.9)])
def test_head_step_is_cross_entropy_with_torch_optim(opt):
    torch.manual_seed(0)
    head = SoftmaxHead(12, 4, lr=0.05, dtype=torch.float64, **opt)
    with torch.no_grad():
        head.weight.normal_()
    lin = torch.nn.Linear(12, 4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(head.weight)
    kw = dict(lr=0.05, weight_decay=opt.get("weight_decay", 0.0))
    tref = (torch.optim.Adam(lin.parameters(), foreach=False, **kw) if opt["optimizer"] == "adam"
            else torch.optim.SGD(lin.parameters(), momentum=0.9, foreach=False, **kw))
    for _ in range(4):
        f, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 4, (9,))
        loss = head.step(f, y)
        tref.zero_grad()
        ref = torch.nn.functional.cross_entropy(lin(f), y)
        ref.backward()
        tref.step()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(head.weight, lin.weight, rtol=1e-12, atol=1e-14)
    assert head.step_count == 4


def test_head_never_changes_the_ff_layers():
    x, y = _data()
    torch.manual_seed(1)
    plain = FFNet([30, 16, 12, 8])
    torch.manual_seed(1)
    headed = FFNet([30, 16, 12, 8], head=True, num_classes=5, head_lr=0.1)
    with torch.no_grad():  # a head far from its zero init: its loss and gradient are large
        headed.head.weight.normal_(0, 10)
    for step in range(3):
        y_neg = (y + 1 + step) % 5
        a = plain.ff_step_labeled(x, y, y_neg, 5)
        b = headed.ff_step_labeled(x, y, y_neg, 5)
        assert torch.equal(a.losses, b.losses) and a.head_loss is None and float(b.head_loss) > 0
    for la, lb in zip(plain.layers, headed.layers):
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.bias, lb.bias)
        assert torch.equal(la.exp_avg_weight, lb.exp_avg_weight)
    assert headed.head.step_count == 3


def test_head_learns_from_features_before_the_update():
    x, y = _data()
    torch.manual_seed(2)
    net = FFNet([30, 16, 12], head=True, num_classes=5, head_lr=0.1)
    with torch.no_grad():
        net.head.weight.normal_()
    before = copy.deepcopy(net)
    out = net.ff_step_labeled(x, y, (y + 2) % 5, 5)
    feats = before.head_features(x)
    assert feats.shape == (16, 12)
    # layer 2's activity, RMS-normalized, of the neutral input through the weights before the step
    h = before.layers[1](before.layers[0](embed_neutral(x, 5)))
    torch.testing.assert_close(feats, h / (h.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8))
    ref = torch.nn.functional.cross_entropy(before.head_logits(x), y)
    torch.testing.assert_close(out.head_loss, ref)
    fresh = copy.deepcopy(before.head)
    fresh.step(feats, y)
    assert torch.equal(fresh.weight, net.head.weight)


def test_head_layers_option_and_errors():
    net = FFNet([30, 16, 12, 8], head=True, num_classes=5, head_layers=[0, 2])
    assert net.head_layers == [0, 2] and net.head.weight.shape == (5, 24)
    assert FFNet([30, 16, 12, 8], head=True, num_classes=5).head.in_features == 20  # layers 2..L
    assert FFNet([30, 16], head=True, num_classes=5).head.in_features == 16          # one layer: itself
    with pytest.raises(ValueError, match="num_classes"):
        FFNet([30, 16], head=True)
    with pytest.raises(ValueError, match="head=True"):
        FFNet([30, 16], head_layers=[0])
    net = FFNet([30, 16, 12], head=True, num_classes=5)
    x, y = _data()
    with pytest.raises(ValueError, match="num_classes=5"):
        net.ff_step_labeled(x, y, (y + 1) % 5, 6)
    with pytest.raises(ValueError, match="no head"):
        FFNet([30, 16]).predict(x, 5, method="head")


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_state_dict_resume_with_head_is_bit_exact(opt):
    x, y = _data(n=24)
    torch.manual_seed(3)
    kw = dict(head=True, num_classes=5, head_optimizer=opt, head_lr=0.05, head_weight_decay=1e-3)
    a = FFNet([30, 16, 12], **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.ff_step_labeled(x, y, None, 5, negatives="hard", generator=gen)
    sd = copy.deepcopy(a.state_dict())
    assert {"head.weight", "head._extra_state"} <= set(sd) and sd["head._extra_state"]["step"] == 3
    assert ("head.exp_avg_weight" in sd) == (opt == "adam") and ("head.momentum_buffer_weight" in sd) == (opt == "sgd")
    b = FFNet([30, 16, 12], **kw)
    b.load_state_dict(sd)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        oa = a.ff_step_labeled(x, y, None, 5, negatives="hard", generator=ga)
        ob = b.ff_step_labeled(x, y, None, 5, negatives="hard", generator=gb)
        assert torch.equal(oa.head_loss, ob.head_loss) and torch.equal(oa.labels_neg, ob.labels_neg)
    for k, v in a.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, b.state_dict()[k]), k


def test_predict_uses_the_head_by_default_in_one_pass(monkeypatch):
    x, y = _data(n=40)
    net = FFNet([30, 16, 12], head=True, num_classes=5)
    with torch.no_grad():
        net.head.weight.normal_()
    pred = net.predict(x, 5, batch_size=7)
    assert torch.equal(pred, net.head_logits(x).argmax(-1))
    # method="goodness" is the arg-max of goodness_scores, not the head (a head with random weights disagrees with it)
    by_goodness = net.predict(x, 5, method="goodness", batch_size=7)
    assert torch.equal(by_goodness, net.goodness_scores(x, 5).argmax(-1))
    assert not torch.equal(by_goodness, pred)
    monkeypatch.setattr(net, "goodness_scores", lambda *a, **k: pytest.fail("evaluation must not score every label"))
    assert accuracy(net, x, y, 5) == pytest.approx(float((pred == y).double().mean()))


def test_non_finite_head_loss_raises_and_leaves_the_head():
    x, y = _data()
    net = FFNet([30, 16, 12], head=True, num_classes=5)
    with torch.no_grad():
        net.head.weight.fill_(float("inf"))
    before = copy.deepcopy(net.head.state_dict())
    with pytest.raises(NonFiniteLossError, match="head"):
        net.ff_step_labeled(x, y, (y + 1) % 5, 5)
    for k, v in net.head.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, before[k]), k
    assert net.head.step_count == 0 and net.layers[0].step_count == 1


def test_leading_dims_with_a_head_and_hard_negatives():
    x, y = _data(n=12)
    net = FFNet([30, 16, 12], head=True, num_classes=5)
    out = net.ff_step_labeled(x.reshape(3, 4, 30), y.reshape(3, 4), None, 5, negatives="hard",
                              generator=torch.Generator().manual_seed(0))
    assert out.labels_neg.shape == (3, 4) and bool((out.labels_neg != y.reshape(3, 4)).all())
    assert out.head_loss.shape == () and net.predict(x.reshape(3, 4, 30), 5).shape == (3, 4)
