"""The reference backend where it is not the oracle: its plumbing.

Its grad/update/step are the oracle's math (autograd, torch.optim), so the "vs oracle" sweeps leave it out
(backends.KERNELS). What is its own: ReferenceBackend.update feeds torch.optim *externally kept* state (FFLinear's
exp_avg/exp_avg_sq/momentum_buffer buffers, the step number as ``step - 1`` in Adam's state, SGD's fresh momentum
buffer copied back on step 1), FFLinear passes its buffers, step_count + 1 and peer_mean, and the peer running mean
is committed after a finite step. Here FFLinear(backend="reference") trains next to oracle.FFLayerRef, which keeps a
real torch.optim optimizer with its own state, so a slip in that plumbing (a step number off by one, a state tensor
not written back, r not committed) shows. The other behaviour files (resume, non-finite rule, split step, bad input,
labeled pair path, FFNet) run the reference too.
"""
import pytest
import torch

from backends import FP32, FP64, REFERENCE
from options import OPTIMIZERS, PEERS
from trajectories import run_and_compare

CASES = [(f"{opt}-{'bias' if i % 2 == 0 else 'nobias'}", dict(OPTIMIZERS[opt]), i % 2 == 0)
         for i, opt in enumerate(OPTIMIZERS)]
CASES += [(f"adam-{p}", dict(OPTIMIZERS["adam"], **PEERS[p]), True) for p in PEERS]
CASES += [("sgd-momentum-wd-peer2-m0.5-nobias", dict(OPTIMIZERS["sgd-momentum-wd"], **PEERS["peer2-m0.5"]), False)]


@pytest.mark.parametrize("dtype", [FP64, FP32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cid,cfg,bias", [pytest.param(*c, id=c[0]) for c in CASES])
def test_fflinear_on_reference_trains_as_torch_optim(cid, cfg, bias, dtype):
    """Five FFLinear steps against FFLayerRef (torch.optim with its own state): outputs, parameters, every state
    tensor and r after each step (symba and a non-default threshold in turn, so both losses meet each optimizer)."""
    loss = dict(loss="symba", symba_alpha=1.5) if "sgd" in cid else dict(threshold=0.5)
    run_and_compare(REFERENCE, 7, 17, 9, steps=5, bias=bias, dtype=dtype, **cfg, **loss)


@pytest.mark.parametrize("cfg", [dict(optimizer="adam", **PEERS["peer0.5-m0.9"]), dict(optimizer="sgd",
                                                                                      momentum=0.9)],
                         ids=["adam-peer", "sgd-momentum"])
def test_labeled_step_on_reference_builds_the_pair(cfg):
    """ff_step_labeled on the reference builds embed_label's pair: the oracle's steps on the explicit pair."""
    run_and_compare(REFERENCE, 7, 40, 24, steps=4, dtype=FP64, labeled_classes=10, label_value=0.5, **cfg)


def test_reference_state_buffers_are_the_ones_updated():
    """The state FFLinear keeps is what the reference's torch.optim updates (in place, not a copy): after a step
    the buffers are non-zero and equal those of a second layer stepped through the backend's update by hand."""
    from ffkernels import FFLinear
    from ffkernels.backends import get_backend

    torch.manual_seed(0)
    layer = FFLinear(6, 4, backend="reference", optimizer="adam", dtype=FP64)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    xp, xn = torch.randn(5, 6, dtype=FP64), torch.randn(5, 6, dtype=FP64)
    layer.ff_step(xp, xn)
    assert layer.step_count == 1
    assert layer.exp_avg_weight.abs().max() > 0 and layer.exp_avg_sq_bias.abs().max() > 0
    st_w, st_b = (torch.zeros_like(w0), torch.zeros_like(w0)), (torch.zeros_like(b0), torch.zeros_like(b0))
    w, b = w0.clone(), b0.clone()
    get_backend("reference").step(xp, xn, w, b, st_w, st_b, 1, layer.config)
    assert torch.equal(w, layer.weight) and torch.equal(b, layer.bias)
    assert torch.equal(st_w[0], layer.exp_avg_weight) and torch.equal(st_w[1], layer.exp_avg_sq_weight)
    assert torch.equal(st_b[0], layer.exp_avg_bias) and torch.equal(st_b[1], layer.exp_avg_sq_bias)
