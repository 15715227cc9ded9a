"""torch.library.opcheck on every op of every compiled namespace, on the shared samples (samples.py): schemas
(mutations declared), fake kernels, autograd registration, dispatch under torch.compile."""
import pytest
import torch

from backends import backend_params, with_ops
from samples import ARGS, MUTATED, sample_ids, sample_inputs


# Under the Triton interpreter (every kernel program in Python, several runs per opcheck) the first three samples:
# they cover every pattern of the optional arguments (all four state slots, one, none; bias or not; loss or not;
# peer_mean or not).
INTERPRETED_SAMPLES = 3


def _cases():
    return [pytest.param(b, op, i, id=f"{b.name}-{op}-{sid}", marks=b.marks)
            for b in with_ops() for op in b.op_names for i, sid in enumerate(sample_ids(op))
            if not b.interpreted or i < INTERPRETED_SAMPLES]


@pytest.mark.parametrize("backend,op,i", _cases())
def test_opcheck(backend, op, i):
    s = sample_inputs(op, backend.device)[i]
    torch.library.opcheck(backend.op(op), s.args(op))


def registered_ops(namespace: str) -> set:
    return {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith(namespace + "::")}


@pytest.mark.parametrize("backend", backend_params(with_ops()))
def test_every_registered_op_has_samples(backend):
    backend.ops  # registers the namespace
    registered = registered_ops(backend.namespace)
    assert set(backend.op_names) <= registered
    assert registered <= set(ARGS), f"ops without samples (add them to samples.py): {registered - set(ARGS)}"


@pytest.mark.parametrize("backend", backend_params(with_ops()))
def test_samples_follow_the_registered_schemas(backend):
    """samples.ARGS is each op's argument list, in order (a clear failure when a schema changes), and samples.MUTATED
    the arguments it declares written: the steps write peer_mean, ff_grad and ff_grad_labeled only read it."""
    for op in backend.op_names:
        args = backend.op(op)._schema.arguments
        names = [a.name for a in args]
        assert names == list(ARGS[op]), f"{backend.namespace}::{op}: schema {names} != samples.ARGS {ARGS[op]}"
        written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
        assert written == list(MUTATED[op]), f"{backend.namespace}::{op}: writes {written}, not {MUTATED[op]}"
