"""torch.compile(fullgraph=True) of a training step on every compiled namespace: the ops trace (fake kernels,
declared mutations) and the compiled step gives the eager results, the in-place update included."""
import pytest
import torch

from backends import with_ops
from samples import sample_inputs


def _cases():
    out = []
    for b in with_ops():
        out.append(pytest.param(b, "aot_eager", id=f"{b.name}-aot_eager", marks=b.marks))
        if b.gpu:  # inductor on the CPU would need a C++ toolchain per test run; on GPUs it schedules the kernels
            out.append(pytest.param(b, "inductor", id=f"{b.name}-inductor", marks=b.marks))
    return out


@pytest.mark.parametrize("backend,compiler", _cases())
def test_compiled_step_matches_eager(backend, compiler):
    s = sample_inputs("ff_step", backend.device)[0]  # Adam, with a bias, non-zero state, peer normalization
    op = backend.op("ff_step")

    def train(*args):
        out = op(*args)
        return out[0] * 2.0, out[1].sum(-1)

    eager, compiled = s.clone(), s.clone()
    expected = train(*eager.args("ff_step"))
    got = torch.compile(train, fullgraph=True, backend=compiler)(*compiled.args("ff_step"))
    assert not torch.equal(compiled["weight"], s["weight"]), "the in-place update did not happen"
    assert not torch.equal(compiled["peer_mean"], s["peer_mean"]), "r was not committed"  # the sample has peer norm
    pairs = list(zip(("2 * loss", "h_pos.sum(-1)"), got, expected))
    pairs += [(k, v, eager[k]) for k, v in compiled.values.items() if isinstance(v, torch.Tensor)]
    for name, a, e in pairs:
        if compiler == "aot_eager":
            assert torch.equal(a, e), name
        else:  # inductor may fuse the loss scaling and the row sums in another order
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=name)
