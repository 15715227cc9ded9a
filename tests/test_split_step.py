"""The step split in two (ff_grad, then ff_update with that gradient and loss) is exactly the fused step, on every
backend: through FFLinear and through the functional ops on every sample. (With peer normalization the split path
cannot advance r: FFLinear.ff_update refuses it, test_peer_norm.py; the functional ops leave r to the step.)"""
import copy

import pytest
import torch

import ffkernels
from backends import backend_dtype_params
from samples import sample_ids, sample_inputs


def _tensors(module):
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("opt", [dict(optimizer="adam", lr=1e-2), dict(optimizer="sgd", momentum=0.9, lr=0.05)],
                         ids=["adam", "sgd-momentum"])
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_fflinear_grad_then_update_equals_step(backend, dtype, opt):
    torch.manual_seed(1)
    a = ffkernels.FFLinear(20, 12, backend=backend.name, device=backend.device, dtype=dtype, **opt)
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        xp, xn = (torch.randn(5, 20, generator=gen, dtype=dtype).to(backend.device) for _ in range(2))
        out = a.ff_step(xp, xn)
        g = b.ff_grad(xp, xn)
        b.ff_update(g.grad_weight, g.grad_bias, loss=g.loss)
        for field, x, y in zip(out._fields, out, g):
            assert torch.equal(x, y), field
    assert a.step_count == b.step_count == 2
    ta, tb = _tensors(a), _tensors(b)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("i", range(len(sample_ids("ff_step"))), ids=sample_ids("ff_step"))
@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
def test_functional_grad_then_update_equals_step(backend, dtype, i):
    """The fused step (on Triton: the optimizer in the weight-gradient kernel's epilogue, dW never written) is
    bitwise ff_grad followed by ff_update, and deterministic. With peer normalization: the same outputs, weights and
    state; ff_grad leaves r as it was, the step commits r'."""
    s = sample_inputs("ff_step", backend.device, dtype)[i]
    fused, again, split = s.clone(), s.clone(), s.clone()

    def step(t):
        return ffkernels.ff_step(t["x_pos"], t["x_neg"], t["weight"], t["bias"], t.states("weight"), t.states("bias"),
                                 s.step, s.cfg, peer_mean=t["peer_mean"], backend=backend.name)

    out = step(fused)
    g = ffkernels.ff_grad(split["x_pos"], split["x_neg"], split["weight"], split["bias"], s.cfg,
                          peer_mean=split["peer_mean"], backend=backend.name)
    ffkernels.ff_update(split["weight"], split["bias"], g.grad_weight, g.grad_bias, split.states("weight"),
                        split.states("bias"), s.step, s.cfg, loss=g.loss, backend=backend.name)
    for field, x, y in zip(out._fields, out, g):
        assert torch.equal(x, y), field
    for name, x in fused.values.items():
        if isinstance(x, torch.Tensor) and name != "peer_mean":
            assert torch.equal(x, split[name]), name
    if s["peer_mean"] is not None:
        assert torch.equal(split["peer_mean"], s["peer_mean"]), "ff_grad or ff_update wrote peer_mean"
        assert not torch.equal(fused["peer_mean"], s["peer_mean"]), "the step did not commit r'"
    for field, x, y in zip(out._fields, out, step(again)):
        assert torch.equal(x, y), f"two identical steps differ in {field}"
    for name, x in fused.values.items():
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, again[name]), f"two identical steps differ in {name}"
