"""Training resumed from a state_dict mid-training continues bit for bit, on every backend: the optimizer state, the
step count and, with peer normalization, its running mean r (the buffer peer_mean) travel in the state_dict."""
import copy

import pytest
import torch

from backends import backend_dtype_params
from ffkernels import FFLinear, wrong_labels

OPTIONS = {
    "adam": dict(optimizer="adam"),
    "sgd": dict(optimizer="sgd", momentum=0.9),
    "adam-peer": dict(optimizer="adam", lr=1e-2, peer_norm=0.8, peer_momentum=0.7),
    "sgd-peer": dict(optimizer="sgd", momentum=0.9, lr=0.01, peer_norm=0.4, peer_momentum=0.8),
}


@pytest.mark.parametrize("labeled", [False, True], ids=["plain", "labeled"])
@pytest.mark.parametrize("opt", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_state_dict_resume_is_bit_exact(backend, dtype, opt, labeled):
    dev = backend.device
    torch.manual_seed(0)
    data = []
    for _ in range(6):
        y = torch.randint(0, 10, (8,))
        data.append((torch.randn(8, 12, dtype=dtype).to(dev), torch.randn(8, 12, dtype=dtype).to(dev), y.to(dev),
                     wrong_labels(y, 10).to(dev)))

    def step(layer, xp, xn, y, yn):
        return layer.ff_step_labeled(xp, y, yn, 10) if labeled else layer.ff_step(xp, xn)

    kw = dict(backend=backend.name, device=dev, dtype=dtype, **opt)
    a = FFLinear(12, 10, **kw)
    for batch in data[:3]:
        step(a, *batch)
    sd = copy.deepcopy(a.state_dict())
    assert "peer_norm" not in opt or sd["peer_mean"].abs().max() > 0
    b = FFLinear(12, 10, **kw)
    b.load_state_dict(sd)
    assert b.step_count == 3
    for batch in data[3:]:
        oa, ob = step(a, *batch), step(b, *batch)
        for field, x, y in zip(oa._fields, oa, ob):
            assert torch.equal(x, y), field
    assert b.step_count == 6
    for k, v in a.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, b.state_dict()[k]), k
