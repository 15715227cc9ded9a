"""torch.library.opcheck on the registered ops: schemas (mutations declared), fake kernels, dispatch."""
import pytest
import torch

from ffkernels import FFConfig
from ffkernels.backends import compiled as _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="ffkernels._C not built")


def _step_args(optimizer="adam", bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype) if bias else None
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    z = lambda t: torch.zeros(t.shape, dtype=sd) if t is not None else None  # noqa: E731
    options = FFConfig(threshold=6.0, optimizer=optimizer, lr=1e-3,
                       momentum=0.9 if optimizer == "sgd" else 0.0).op_options
    # x_pos, x_neg, weight, bias, 4 state slots, peer_mean (None: peer norm off), step, options
    return [torch.randn(5, 9, generator=g, dtype=dtype), torch.randn(5, 9, generator=g, dtype=dtype), w, b,
            z(w), z(w), z(b), z(b), None, 1, options]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_ff_step(optimizer, bias):
    torch.library.opcheck(torch.ops.ffkernels.ff_step.default, _step_args(optimizer, bias))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_ff_grad(bias):
    a = _step_args(bias=bias)
    torch.library.opcheck(torch.ops.ffkernels.ff_grad.default, a[:4] + [None, a[10]])


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_ff_update(bias):
    a = _step_args(bias=bias)
    gw = torch.randn_like(a[2])
    gb = torch.randn_like(a[3]) if bias else None
    args = [a[2], a[3], gw, gb, *a[4:8], torch.tensor(0.5), 1, a[10]]
    torch.library.opcheck(torch.ops.ffkernels.ff_update.default, args)


def test_ff_step_traces_under_torch_compile():
    a = _step_args()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(*args):
        return torch.ops.ffkernels.ff_step(*args)

    ref = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    out = step(*a)
    out_ref = torch.ops.ffkernels.ff_step(*ref)
    torch.testing.assert_close(out[0], out_ref[0])
    torch.testing.assert_close(a[2], ref[2])
