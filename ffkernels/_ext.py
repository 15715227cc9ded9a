"""Loading the compiled extension ``ffkernels._C`` (which registers the ``torch.ops.ffkernels`` ops)."""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (libtorch must be loaded before _C)

_C = None
_error: "str | None" = None

try:
    from . import _C  # noqa: F811
except ImportError as e:  # not built, or built against another torch
    _error = str(e)
    warnings.warn(
        "ffkernels: the compiled extension ffkernels._C could not be loaded "
        f"({_error}); only the 'reference' (and, where usable, 'triton') backends are available. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def load_error() -> "str | None":
    return _error


def built_with_cuda() -> bool:
    return bool(_C is not None and getattr(_C, "with_cuda", 0))


def cuda_archs() -> str:
    return getattr(_C, "cuda_archs", "") if _C is not None else ""
