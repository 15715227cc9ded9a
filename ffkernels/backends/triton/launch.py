"""How the host code launches a Triton kernel: through ``wrap_triton`` where torch can trace it, else directly; on
the tensors' own device; and a compatibility fix for older Triton interpreters.

On GPUs ``@triton.jit`` gives a ``JITFunction``; ``torch.library.wrap_triton`` makes its launch visible to
torch.compile inside the ``triton_op``s. Under the interpreter (TRITON_INTERPRET=1) ``@triton.jit`` gives an
``InterpretedFunction``, which torch 2.14 passes through but torch 2.11 refuses ("wrap_triton only works on
functions annotated with triton.jit or triton.autotune"); those ops are opaque ``custom_op``s anyway.

Triton launches a kernel on the *current* CUDA device (and its current stream), whatever device the pointers
point to: the ops run their launches inside ``on_device(tensor)``, which makes the tensors' device current.
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction

from . import settings


def launchable(kernel):
    """``kernel[grid](...)``-launchable form of a ``@triton.jit`` kernel."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def on_device(tensor: torch.Tensor):
    """Context in which ``tensor``'s CUDA device is the current one (so Triton launches there, on that device's
    current stream); no-op for tensors elsewhere (CPU tensors under the interpreter, meta tensors) and for fake
    tensors: a traced launch (torch.compile, or tracing the GPU path on a machine without one) runs nothing now,
    and switching the device would initialize CUDA."""
    device = tensor.device
    if device.type != "cuda" or is_fake(tensor):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def fix_interpreter_index() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` accept its own scalars. Returns whether it patched.

    Triton's interpreter holds a scalar kernel argument (e.g. ``K``) as a 1-element numpy array. Up to Triton 3.6
    its ``__index__`` is ``int(self.handle.data)``, which numpy >= 2.4 refuses for an array of shape (1,) ("only
    0-dimensional arrays can be converted to Python scalars"), so ``for k0 in range(0, K, BLOCK_K)`` fails; later
    Triton versions squeeze the array first. This installs that behaviour on the interpreter's per-launch patch of
    ``tl.tensor`` (a no-op change where Triton already does it). Idempotent; nothing happens outside the
    interpreter or where Triton's internals differ.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ffkernels_index_fix", False):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._ffkernels_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if settings.interpreting():
    fix_interpreter_index()
