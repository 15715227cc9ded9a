"""The C++ CPU kernels: the thread count (torch.set_num_threads) does not change the results."""
import pytest
import torch

import ffkernels
from backends import CPU


@pytest.mark.skipif(CPU.skip_reason is not None, reason=f"cpu: {CPU.skip_reason}")
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


@pytest.mark.skipif(CPU.skip_reason is not None, reason=f"cpu: {CPU.skip_reason}")
def test_thread_count_does_not_change_the_peer_norm_terms():
    """Peer normalization's column means are summed per column in row order (threads own column ranges): the loss
    (L_peer included) and the goodness are the same bit for bit."""
    g = torch.Generator().manual_seed(4)
    xp, xn, w, b = (torch.randn(*s, generator=g) for s in ((64, 50), (64, 50), (300, 50), (300,)))
    r = torch.rand(300, generator=g)
    opts = ffkernels.FFConfig(peer_norm=0.5, peer_momentum=0.7).op_options
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.ffkernels.ff_grad(xp, xn, w, b, r, opts)
        torch.set_num_threads(max(2, old))
        many = torch.ops.ffkernels.ff_grad(xp, xn, w, b, r, opts)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[3], many[3])
