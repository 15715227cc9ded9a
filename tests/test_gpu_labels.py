"""Out-of-range labels at the labeled ops on a GPU: the range is not read on the host there (that would synchronize
at every step), so the op clamps them for its kernels and makes the loss NaN: nothing is updated. FFNet checks the
labels itself and raises ValueError at the end of its step (test_host_syncs.py, test_labeled.py). On the CPU and under
the interpreter the ops raise (test_bad_op_arguments.py). Skipped without a GPU."""
import pytest
import torch

from backends import CUDA_BACKEND, TRITON, backend_params
from ffkernels import FFLinear

GPU_BACKENDS = [p for p in backend_params((CUDA_BACKEND, TRITON)) if p.values[0].device == "cuda"]
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", GPU_BACKENDS or [pytest.param(None, marks=pytest.mark.skip("no GPU"))])
@pytest.mark.parametrize("peer", [0.0, 0.03], ids=["plain", "peer"])
def test_out_of_range_label_gives_a_nan_loss_and_changes_nothing(backend, peer):
    if backend.skip_reason:
        pytest.skip(backend.skip_reason)
    torch.manual_seed(0)
    layer = FFLinear(40, 24, backend=backend.name, peer_norm=peer, device="cuda")
    x = torch.rand(9, 40, device="cuda")
    y_pos = torch.randint(0, 10, (9,), device="cuda")
    y_neg = (y_pos + 1) % 10
    layer.ff_step_labeled(x, y_pos, y_neg, 10)  # one good step: non-zero optimizer state
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = y_pos.clone()
    bad[3] = 10
    op = getattr(torch.ops, "ffkernels_triton" if backend.name == "triton" else "ffkernels").ff_step_labeled
    w, b = layer.weight.data, layer.bias.data
    st = layer._states("weight") + layer._states("bias")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the op must not read the labels on the host
    try:
        loss = op(x, bad, y_neg, 10, 1.0, w, b, *st, layer._peer_mean(), layer.step_count + 1,
                  layer.config.op_options)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isnan(loss).item()
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
