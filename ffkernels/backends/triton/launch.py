"""How the host code launches a Triton kernel: through ``wrap_triton`` where torch can trace it, else directly.

On GPUs ``@triton.jit`` gives a ``JITFunction``; ``torch.library.wrap_triton`` makes its launch visible to
torch.compile inside the ``triton_op``s. Under the interpreter (TRITON_INTERPRET=1) ``@triton.jit`` gives an
``InterpretedFunction``, which torch 2.14 passes through but torch 2.11 refuses ("wrap_triton only works on
functions annotated with triton.jit or triton.autotune"); those ops are opaque ``custom_op``s anyway.
"""
from torch.library import wrap_triton
from triton.runtime.jit import JITFunction


def launchable(kernel):
    """``kernel[grid](...)``-launchable form of a ``@triton.jit`` kernel."""
    return wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel
