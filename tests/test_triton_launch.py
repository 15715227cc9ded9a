"""How the Triton ops launch their kernels (ffkernels/backends/triton/launch.py): on the tensors' CUDA device
whatever device is current, and under older interpreters (Triton 3.6 with numpy >= 2.4) with scalar arguments
that ``range`` accepts."""
import contextlib
import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from backends import TRITON, TRITON_PACKAGE, backend_params

pytest.importorskip("triton")
launch = pytest.importorskip(f"{TRITON_PACKAGE}.launch")


class _Recorder:
    """Stands for torch.cuda.device: records the device it is entered with."""

    def __init__(self):
        self.entered = []

    def __call__(self, device):
        @contextlib.contextmanager
        def cm():
            self.entered.append(torch.device(device))
            yield
        return cm()


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    with launch.on_device(SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert rec.entered == [torch.device("cuda", 1)]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a traced launch (torch.compile; tests/test_triton_ptxas.py traces without a GPU)
        fake = torch.empty(2, device="cuda:1")
    for other in (torch.zeros(2), torch.zeros(2, device="meta"), fake):  # the interpreter's CPU tensors; others
        with launch.on_device(other):
            pass
    assert rec.entered == [torch.device("cuda", 1)], "only real CUDA tensors switch the device"


@pytest.mark.parametrize("backend", backend_params((TRITON,)))
def test_every_launch_runs_on_the_weights_device(backend, monkeypatch):
    """Each op runs every kernel launch inside on_device(weight) (on a GPU that switches to the weight's device)."""
    assert backend.ops is not None  # registers torch.ops.ffkernels_triton
    ops = importlib.import_module(f"{TRITON_PACKAGE}.ops")
    active, launched = [], []

    @contextlib.contextmanager
    def guard(t):
        active.append(t.device)
        try:
            yield
        finally:
            active.pop()

    def watched(name, fn):
        def run(*args, **kwargs):
            launched.append((name, list(active)))
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(ops, "on_device", guard)
    for name in ("launch_forward", "launch_loss", "launch_weight_grad", "launch_update"):
        monkeypatch.setattr(ops, name, watched(name, getattr(ops, name)))
    import ffkernels

    dev = backend.device
    cfg = ffkernels.FFConfig(optimizer="adam", peer_norm=0.1)
    torch.manual_seed(0)
    w, b = torch.randn(5, 8, device=dev), torch.randn(5, device=dev)
    st_w = tuple(torch.zeros_like(w) for _ in cfg.state_names)
    st_b = tuple(torch.zeros_like(b) for _ in cfg.state_names)
    r = torch.zeros(5, device=dev)
    x = torch.randn(3, 8, device=dev)
    ffkernels.ff_step(x, x.flip(0), w, b, st_w, st_b, 1, cfg, peer_mean=r, backend="triton")
    g = ffkernels.ff_grad(x, x.flip(0), w, b, cfg, peer_mean=r, backend="triton")
    ffkernels.ff_update(w, b, g.grad_weight, g.grad_bias, st_w, st_b, 2, cfg, loss=g.loss, backend="triton")
    names = {name for name, _ in launched}
    assert names == {"launch_forward", "launch_loss", "launch_weight_grad", "launch_update"}, names
    assert all(devices == [w.device] for _, devices in launched), launched


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_layer_on_the_second_gpu_steps_there_while_the_first_is_current():
    from ffkernels import FFLinear

    torch.manual_seed(0)
    layers = [FFLinear(24, 16, backend="triton", device=f"cuda:{i}") for i in (0, 1)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 24)
    torch.cuda.set_device(0)
    for _ in range(3):
        outs = [layer.ff_step(x.to(layer.weight.device), x.flip(0).to(layer.weight.device)) for layer in layers]
    torch.cuda.synchronize(1)
    assert torch.equal(outs[0].loss.cpu(), outs[1].loss.cpu())
    for (k, v0), v1 in zip(layers[0].state_dict().items(), layers[1].state_dict().values()):
        if isinstance(v0, torch.Tensor):
            assert torch.equal(v0.cpu(), v1.cpu()), k


def test_the_interpreter_index_fix_accepts_one_element_scalars():
    """Triton <= 3.6's interpreter: ``int(array of shape (1,))`` fails under numpy >= 2.4; the fix squeezes."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interpreter, "_LangPatchScope") or not hasattr(interpreter, "_patch_lang_tensor"):
        pytest.skip("this Triton's interpreter has other internals (the fix does not apply)")
    launch.fix_interpreter_index()
    assert getattr(interpreter._patch_lang_tensor, "_ffkernels_index_fix", False)
    assert not launch.fix_interpreter_index(), "applied once"

    class Scalar:  # stands for tl.tensor during one interpreted launch
        pass

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Scalar, scope)
    try:
        k = Scalar()
        k.handle = SimpleNamespace(data=np.array([7], dtype=np.int32))
        assert list(range(0, k, 3)) == [0, 3, 6]
    finally:
        scope.restore()
