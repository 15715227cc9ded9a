"""Training resumed from a state_dict mid-training continues bit for bit, on every backend."""
import copy

import pytest
import torch

from backends import backend_dtype_params
from ffkernels import FFLinear


@pytest.mark.parametrize("opt", [dict(optimizer="adam"), dict(optimizer="sgd", momentum=0.9)], ids=["adam", "sgd"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_state_dict_resume_is_bit_exact(backend, dtype, opt):
    torch.manual_seed(0)
    data = [tuple(torch.randn(8, 12, dtype=dtype).to(backend.device) for _ in range(2)) for _ in range(6)]
    kw = dict(backend=backend.name, device=backend.device, dtype=dtype, **opt)
    a = FFLinear(12, 10, **kw)
    for xp, xn in data[:3]:
        a.ff_step(xp, xn)
    sd = copy.deepcopy(a.state_dict())
    b = FFLinear(12, 10, **kw)
    b.load_state_dict(sd)
    assert b.step_count == 3
    for xp, xn in data[3:]:
        oa, ob = a.ff_step(xp, xn), b.ff_step(xp, xn)
        assert torch.equal(oa.loss, ob.loss)
    assert b.step_count == 6
    for k, v in a.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, b.state_dict()[k]), k
