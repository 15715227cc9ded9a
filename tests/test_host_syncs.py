"""At most one host sync per FFNet.ff_step / ff_step_labeled, whatever the depth (docs/design.md, "Host syncs").

A host sync is where Python reads a device value: ``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()``,
``t.tolist()``, ``t.cpu()``, ``t.numpy()``, ``t.nonzero()``, boolean-mask indexing. On the CPU these cost nothing,
so the count is taken at the Python level: ``count_syncs`` patches those methods of torch.Tensor for the duration
of one call and counts them, which works on any machine. On a GPU the same steps also run under
``torch.cuda.set_sync_debug_mode("warn")``, which counts the syncs the driver sees.
"""
import warnings
from contextlib import contextmanager

import pytest
import torch

from backends import CPU, CUDA_BACKEND, TRITON, backend_params
from ffkernels import FFLinear, FFNet
from ffkernels.backends import get_backend
from ffkernels.training import train_ff_epoch

SYNC_METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
                "__array__")


@contextmanager
def count_syncs():
    """Yields a list that collects the name of every host-reading Tensor method called inside the block."""
    calls = []
    saved = {name: torch.Tensor.__dict__.get(name) for name in SYNC_METHODS}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS if hasattr(torch.Tensor, name)}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            calls.append(name)
            return fn(self, *args, **kwargs)
        return counted

    orig_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
            calls.append("__getitem__[bool mask]")
        return orig_getitem(self, index)

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.Tensor.__getitem__ = getitem
        yield calls
    finally:
        for name in originals:
            if saved[name] is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved[name])
        torch.Tensor.__getitem__ = orig_getitem


def syncs_of(fn):
    """The host syncs ``fn()`` makes: the Python-level count, and on CUDA the count of the sync debug mode (max)."""
    with count_syncs() as calls:
        fn()
    n = len(calls)
    if torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = max(n, sum("synchroniz" in str(w.message) for w in seen))
    return n, calls


# the op backends (the reference checks on the host by design; the Triton interpreter copies to numpy itself)
STEP_BACKENDS = backend_params((CPU, TRITON, CUDA_BACKEND))
DEPTH = [20, 16, 16, 16, 16]  # four layers


def _skip_interpreter(backend):
    if backend.interpreted:
        pytest.skip("the Triton interpreter reads its arguments on the host itself")


def _data(backend, n=6, k=20, c=4):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, k, generator=g).to(backend.device)
    y = torch.randint(0, c, (n,), generator=g).to(backend.device)
    return x, y, ((y + 1) % c)


@pytest.mark.parametrize("peer", [False, True], ids=["plain", "peer"])
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_ffnet_ff_step_syncs_once(backend, peer):
    _skip_interpreter(backend)
    torch.manual_seed(0)
    net = FFNet(DEPTH, backend=backend.name, device=backend.device, peer_norm=0.03 if peer else 0.0)
    x, y, _ = _data(backend)
    net.ff_step(x, x.flip(0))  # warm-up (Triton JIT, lazy inits)
    n, calls = syncs_of(lambda: net.ff_step(x, x.flip(0), return_outputs=True))
    assert n <= 1, calls
    assert all(layer.step_count == 2 + torch.cuda.is_available() for layer in net.layers)


@pytest.mark.parametrize("negatives", ["random", "hard"])
@pytest.mark.parametrize("first_layer", ["shared", "pair"])
@pytest.mark.parametrize("head", [False, True], ids=["no-head", "head"])
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_ffnet_ff_step_labeled_syncs_once(backend, head, first_layer, negatives):
    _skip_interpreter(backend)
    torch.manual_seed(0)
    net = FFNet(DEPTH, backend=backend.name, device=backend.device, peer_norm=0.03, head=head,
                num_classes=4 if head else None)
    x, y, y_neg = _data(backend)
    gen = torch.Generator(device=backend.device).manual_seed(1)

    def step():
        return net.ff_step_labeled(x, y, y_neg if negatives == "random" else None, 4, negatives=negatives,
                                   generator=gen, first_layer=first_layer)

    step()
    n, calls = syncs_of(step)
    assert n <= 1, calls
    assert all(layer.step_count == net.layers[0].step_count > 1 for layer in net.layers)
    assert not head or net.head.step_count == net.layers[0].step_count


def test_the_unfused_labeled_first_layer_syncs_once(monkeypatch):
    """A backend without a fused labeled step (CUDA, Triton) builds the pair without reading the labels."""
    if CPU.skip_reason:
        pytest.skip(CPU.skip_reason)
    monkeypatch.delattr(get_backend("cpu"), "step_labeled")
    net = FFNet(DEPTH, backend="cpu", head=True, num_classes=4)
    x, y, y_neg = _data(CPU)
    n, calls = syncs_of(lambda: net.ff_step_labeled(x, y, y_neg, 4))
    assert n <= 1, calls
    layer = FFLinear(20, 8, backend="cpu")
    n, calls = syncs_of(lambda: layer.ff_step_labeled(x, y, y_neg, 4))
    assert n == 1, calls  # a standalone layer's step reads its own loss: one sync


def test_the_count_sees_a_per_layer_check(monkeypatch):
    """The counter would catch the per-layer check coming back: reading each layer's loss is one sync per layer."""
    if CPU.skip_reason:
        pytest.skip(CPU.skip_reason)
    net = FFNet(DEPTH, backend="cpu")
    x, _, _ = _data(CPU)
    step = FFLinear._step

    def checked_step(self, *args):
        out = step(self, *args)
        self._check_finite(out.loss)
        return out

    monkeypatch.setattr(FFLinear, "_step", checked_step)
    n, calls = syncs_of(lambda: net.ff_step(x, x.flip(0)))
    assert n == 1 + len(DEPTH) - 1, calls


def test_a_training_epoch_reads_the_losses_once_per_epoch():
    """train_ff_epoch keeps the loss sums on the device: the syncs of an epoch are those of its steps, plus one."""
    if CPU.skip_reason:
        pytest.skip(CPU.skip_reason)
    torch.manual_seed(0)
    net = FFNet(DEPTH, backend="cpu", head=True, num_classes=4)
    x, y, _ = _data(CPU, n=40)
    with count_syncs() as calls:
        stats = train_ff_epoch(net, x, y, 4, 10, torch.Generator().manual_seed(0))
    assert len(calls) <= 4 + 1, calls
    assert len(stats.loss) == len(net.layers) and stats.head_loss is not None
