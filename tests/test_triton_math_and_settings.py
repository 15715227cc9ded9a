"""The Triton backend's own pieces: its math helpers at extreme arguments (under the interpreter) and the float32
precision switch."""
import importlib

import pytest
import torch

from backends import INTERPRET, RUN_INTERPRETER, TRITON_PACKAGE

triton = pytest.importorskip("triton")
tl = triton.language
_ff_math = importlib.import_module(f"{TRITON_PACKAGE}.ff_math")
softplus, sigmoid = _ff_math.softplus, _ff_math.sigmoid
settings = importlib.import_module(f"{TRITON_PACKAGE}.settings")

pytestmark = pytest.mark.triton


@triton.jit
def _softplus_sigmoid_kernel(x_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(sp_ptr + offs, softplus(x), mask=offs < n)
    tl.store(sg_ptr + offs, sigmoid(x), mask=offs < n)


@pytest.mark.skipif(not INTERPRET, reason=f"runs under the Triton interpreter: `{RUN_INTERPRETER}`")
def test_softplus_and_sigmoid_are_stable_and_accurate():
    """No overflow for large |x|, full relative accuracy where the value is tiny (log1p without libdevice)."""
    x = torch.tensor([-200.0, -80.0, -30.0, -17.0, -1e-3, 0.0, 1e-7, 0.5, 17.0, 30.0, 80.0, 200.0, float("nan")])
    sp, sg = torch.empty_like(x), torch.empty_like(x)
    _softplus_sigmoid_kernel[(1,)](x, sp, sg, x.numel(), BLOCK=16)
    x64 = x.double()  # float64 truth rounded to float32; within 2 float32 ulps
    torch.testing.assert_close(sp, torch.nn.functional.softplus(x64).float(), rtol=3e-7, atol=0, equal_nan=True)
    torch.testing.assert_close(sg, torch.sigmoid(x64).float(), rtol=3e-7, atol=0, equal_nan=True)


def test_fp32_precision_switch():
    assert settings.get_fp32_precision() == "ieee"  # exact float32 products unless asked otherwise
    try:
        settings.set_fp32_precision("tf32")
        assert settings.get_fp32_precision() == "tf32"
        assert settings.dot_precision(torch.float32) == "tf32" and settings.dot_precision(torch.bfloat16) == "ieee"
    finally:
        settings.set_fp32_precision("ieee")
    with pytest.raises(ValueError, match="unknown fp32 precision 'fp16'"):
        settings.set_fp32_precision("fp16")
    assert settings.get_fp32_precision() == "ieee"
