"""Hard negatives: never the true label, drawn in proportion to softmax of the scores over the wrong labels."""
import pytest
import torch

from ffkernels import FFNet, hard_negatives


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def test_never_the_true_label_whatever_the_scores():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (5000,), generator=g)
    scores = torch.randn(5000, 10, generator=g) * 50
    scores[torch.arange(5000), y] = 1e6  # the model is sure of the true label
    scores[:100] = float("-inf")
    scores[100:200, 3] = float("nan")
    scores[200:300] = float("inf")
    neg = hard_negatives(scores, y, g)
    assert neg.shape == y.shape and neg.dtype == torch.int64
    assert bool((neg != y).all()) and int(neg.min()) >= 0 and int(neg.max()) <= 9


def test_follows_softmax_of_the_scores_over_the_wrong_labels():
    n = 40000
    scores = torch.tensor([5.0, 0.0, 1.0, 2.0, -1.0]).repeat(n, 1)
    y = torch.zeros(n, dtype=torch.long)  # true label 0 holds the highest score: it must never be drawn
    neg = hard_negatives(scores, y, torch.Generator().manual_seed(1))
    freq = torch.bincount(neg, minlength=5).double() / n
    want = torch.softmax(torch.tensor([-float("inf"), 0.0, 1.0, 2.0, -1.0], dtype=torch.float64), 0)
    assert freq[0] == 0
    assert (freq - want).abs().max() < 0.01, (freq, want)   # uniform (0.25 each) misses by 0.4
    # temperature flattens the distribution towards uniform
    hot = hard_negatives(scores, y, torch.Generator().manual_seed(1), temperature=1e6)
    assert (torch.bincount(hot, minlength=5).double() / n - torch.tensor([0, .25, .25, .25, .25])).abs().max() < 0.01


def test_same_generator_state_same_draw_and_bad_input():
    s, y = torch.randn(7, 4), torch.randint(0, 4, (7,))
    assert torch.equal(hard_negatives(s, y, torch.Generator().manual_seed(3)),
                       hard_negatives(s, y, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="scores"):
        hard_negatives(torch.randn(7), y)
    with pytest.raises(ValueError, match="labels"):
        hard_negatives(s, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        hard_negatives(s, y, temperature=0.0)


def test_ffnet_hard_negatives_use_the_head_logits_else_the_goodness():
    x, y = torch.rand(64, 30), torch.randint(0, 5, (64,))
    net = FFNet([30, 16, 12], head=True, num_classes=5)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.weight[3] = 100.0  # every input: class 3 by far
    out = net.ff_step_labeled(x, y, None, 5, negatives="hard", generator=torch.Generator().manual_seed(0))
    assert bool((out.labels_neg[y != 3] == 3).all()) and bool((out.labels_neg != y).all())

    plain = FFNet([30, 16, 12])
    scores = plain.goodness_scores(x, 5)
    want = hard_negatives(scores, y, torch.Generator().manual_seed(4))
    out = plain.ff_step_labeled(x, y, None, 5, negatives="hard", generator=torch.Generator().manual_seed(4))
    assert torch.equal(out.labels_neg, want)
    with pytest.raises(ValueError, match="labels_neg=None"):
        plain.ff_step_labeled(x, y, (y + 1) % 5, 5, negatives="hard")
    with pytest.raises(ValueError, match="negatives"):
        plain.ff_step_labeled(x, y, None, 5, negatives="easy")
