"""The fused C++ CPU backend against the autograd + torch.optim oracle (ffkernels.reference)."""
import itertools

import pytest
import torch

import ffkernels
from helpers import run_and_compare

pytestmark = pytest.mark.skipif("cpu" not in ffkernels.available_backends(),
                                reason="ffkernels._C is not built (see test_build.py, which fails then)")

SHAPES_B = (1, 7, 64)
SHAPES_KN = (1, 17, 128, 784)

OPTIMIZERS = [
    dict(optimizer="adam"),
    dict(optimizer="adam", weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6, lr=1e-2),
    dict(optimizer="sgd", lr=1e-2),
    dict(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-3),
]
LOSSES = [dict(loss="hinton"), dict(loss="hinton", threshold=0.5), dict(loss="symba"), dict(loss="symba", symba_alpha=1.5)]


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("fp32", "fp64"))
@pytest.mark.parametrize("N", SHAPES_KN)
@pytest.mark.parametrize("K", SHAPES_KN)
@pytest.mark.parametrize("B", SHAPES_B)
def test_every_shape(B, K, N, dtype):
    # options rotate with the shape so that every shape meets several option values
    i = SHAPES_B.index(B) + 3 * SHAPES_KN.index(K) + 12 * SHAPES_KN.index(N)
    cfg = {**OPTIMIZERS[i % 4], **LOSSES[(i // 4) % 4], "norm": ("rms", "l2", "none")[i % 3],
           "goodness": ("sum", "mean")[(i // 3) % 2]}
    run_and_compare("cpu", B, K, N, bias=bool(i % 5), dtype=dtype, **cfg)


@pytest.mark.parametrize("norm,goodness,loss,opt,bias",
                         list(itertools.product(("rms", "l2", "none"), ("sum", "mean"), range(len(LOSSES)),
                                                range(len(OPTIMIZERS)), (True, False))))
def test_every_option_fp32(norm, goodness, loss, opt, bias):
    run_and_compare("cpu", 7, 17, 33, steps=4, bias=bias, norm=norm, goodness=goodness, **LOSSES[loss],
                    **OPTIMIZERS[opt])


@pytest.mark.parametrize("norm,goodness,loss,opt",
                         list(itertools.product(("rms", "l2", "none"), ("sum", "mean"), (0, 2), range(len(OPTIMIZERS)))))
def test_every_option_fp64_tight(norm, goodness, loss, opt):
    run_and_compare("cpu", 64, 128, 17, steps=5, dtype=torch.float64, norm=norm, goodness=goodness,
                    **LOSSES[loss], **OPTIMIZERS[opt])


def test_many_steps_large_layer():
    """20 steps of a 784 -> 128 layer: errors must not grow into a different trajectory."""
    run_and_compare("cpu", 64, 784, 128, steps=20, tol=1e-4)


def test_thread_count_does_not_change_results():
    torch.manual_seed(0)
    x = torch.rand(64, 784), torch.rand(64, 784)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            layer = ffkernels.FFLinear(784, 256, backend="cpu")
            outs.append((layer.ff_step(*x), layer.weight.detach().clone()))
    finally:
        torch.set_num_threads(old)
    (o1, w1), (o2, w2) = outs
    torch.testing.assert_close(o1.loss, o2.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)
