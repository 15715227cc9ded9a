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
