"""Goodness prediction shares the first layer across labels: it equals scoring every embedded label."""
import pytest
import torch

from ffkernels import FFNet, embed_label


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def _explicit_scores(net, x, num_classes, layers, value):
    """The pre-sharing implementation: embed each label, run the whole net, sum the goodness of ``layers``."""
    return torch.stack([net.goodness(embed_label(x, torch.full(x.shape[:-1], c), num_classes, value))[..., layers].sum(-1)
                        for c in range(num_classes)], dim=-1)


@pytest.mark.parametrize("norm", ["rms", "l2", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layers,value", [(None, 1.0), ([0, 2], 0.7), ([2, 2, 1], 3.0)])
def test_goodness_scores_equal_scoring_every_embedded_label(norm, bias, layers, value):
    torch.manual_seed(0)
    net = FFNet([23, 17, 13, 11], bias=bias, norm=norm, goodness="mean" if norm == "l2" else "sum",
                dtype=torch.float64)
    x = torch.rand(9, 23, dtype=torch.float64)
    x[:, :7] = torch.randn(9, 7, dtype=torch.float64)  # whatever the label slots held is overwritten
    want = _explicit_scores(net, x, 7, net.predict_layers if layers is None else layers, value)
    got = net.goodness_scores(x, 7, layers, value)
    assert got.shape == (9, 7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(net.predict(x, 7, layers, value, batch_size=4, method="goodness"), want.argmax(-1))


def test_goodness_scores_keep_leading_dims_and_check_inputs():
    net = FFNet([20, 8, 8])
    x = torch.rand(2, 3, 20)
    assert net.goodness_scores(x, 4).shape == (2, 3, 4) and net.predict(x, 4).shape == (2, 3)
    with pytest.raises(ValueError, match="features"):
        net.goodness_scores(torch.rand(3, 19), 4)
    with pytest.raises(ValueError, match="num_classes"):
        net.goodness_scores(x, 21)
    with pytest.raises(ValueError, match="predict method"):
        net.predict(x, 4, method="vote")
