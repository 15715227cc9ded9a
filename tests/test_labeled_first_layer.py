"""The supervised first-layer step (x with labels written in, shared B-row GEMMs) against the oracle on
the explicit positive/negative pair."""
import itertools

import pytest
import torch

import ffkernels
from ffkernels import FFNet
from helpers import run_and_compare

pytestmark = pytest.mark.skipif("cpu" not in ffkernels.available_backends(), reason="ffkernels._C not built")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("B,K,N,C", [(1, 10, 1, 10), (7, 17, 17, 10), (64, 128, 33, 4), (64, 784, 128, 10),
                                     (7, 2, 5, 2)])
def test_shapes(B, K, N, C, dtype):
    run_and_compare("cpu", B, K, N, labeled_classes=C, dtype=dtype)


@pytest.mark.parametrize("norm,goodness,loss,optimizer,bias",
                         list(itertools.product(("rms", "l2", "none"), ("sum", "mean"), ("hinton", "symba"),
                                                ("adam", "sgd"), (True, False))))
def test_options(norm, goodness, loss, optimizer, bias):
    run_and_compare("cpu", 7, 40, 24, labeled_classes=10, label_value=0.5, bias=bias, norm=norm,
                    goodness=goodness, loss=loss, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0.0,
                    weight_decay=1e-3)


def test_ffnet_labeled_equals_explicit_pairs():
    torch.manual_seed(0)
    a = FFNet([30, 16, 16], dtype=torch.float64)
    b = FFNet([30, 16, 16], dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x = torch.rand(8, 30, dtype=torch.float64)
        y = torch.randint(0, 10, (8,))
        yn = ffkernels.wrong_labels(y, 10)
        oa = a.ff_step_labeled(x, y, yn, 10)
        ob = b.ff_step(ffkernels.embed_label(x, y, 10), ffkernels.embed_label(x, yn, 10))
        torch.testing.assert_close(oa.losses, ob.losses, rtol=1e-12, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(labels_pos=torch.tensor([0, 1, 10])), ValueError, r"label_pos must lie in \[0, 10\)"),
    (dict(labels_neg=torch.tensor([0, 1])), ValueError, "label_neg must have shape"),
    (dict(labels_pos=torch.tensor([0.0, 1.0, 2.0])), TypeError, "integer"),
    (dict(num_classes=41), ValueError, "num_classes"),
])
def test_bad_labels(kw, exc, msg):
    layer = ffkernels.FFLinear(40, 8, backend="cpu")
    a = dict(x=torch.rand(3, 40), labels_pos=torch.tensor([0, 1, 2]), labels_neg=torch.tensor([3, 4, 5]),
             num_classes=10)
    a.update(kw)
    w0 = layer.weight.detach().clone()
    with pytest.raises(exc, match=msg):
        layer.ff_step_labeled(**a)
    assert torch.equal(layer.weight, w0) and layer.step_count == 0


def test_opcheck_labeled_ops():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 12, generator=g), torch.randn(6, generator=g)
    x, yp, yn = torch.rand(5, 12, generator=g), torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 0])
    options = ffkernels.FFConfig(threshold=6.0, lr=1e-3).op_options
    torch.library.opcheck(torch.ops.ffkernels.ff_grad_labeled.default, [x, yp, yn, 5, 1.0, w, b, None, options])
    states = [torch.zeros(6, 12), torch.zeros(6, 12), torch.zeros(6), torch.zeros(6)]
    torch.library.opcheck(torch.ops.ffkernels.ff_step_labeled.default,
                          [x, yp, yn, 5, 1.0, w, b, *states, None, 1, options])
