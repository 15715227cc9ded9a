"""The compiled extension: loaded, its ops registered per device, toolkit detection, fallback without it."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import ffkernels
from backends import cuda_build_expected
from ffkernels.backends import compiled as _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("ff_grad", "ff_update", "ff_step")
LABELED_OPS = ("ff_grad_labeled", "ff_step_labeled")  # the supervised first layer
CONV_OPS = ("ff_conv_grad", "ff_conv_step")  # the convolutional step


@pytest.mark.skipif(os.environ.get("FFKERNELS_NO_EXT") == "1", reason="pure-Python install requested")
def test_extension_is_built_and_loaded():
    assert _ext.loaded(), f"ffkernels._C did not load: {_ext.load_error()}"
    assert "cpu" in ffkernels.available_backends()


@pytest.mark.skipif(not _ext.loaded(), reason="ffkernels._C not built")
def test_every_op_has_kernels_for_the_devices_it_was_built_for():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in OPS + LABELED_OPS + CONV_OPS:
        assert has(f"ffkernels::{op}", "CPU"), op
        assert has(f"ffkernels::{op}", "CUDA") == _ext.built_with_cuda(), op


@pytest.mark.skipif(not _ext.loaded(), reason="ffkernels._C not built")
def test_cuda_build_when_expected():
    """FFKERNELS_EXPECT_CUDA=1 (CI with a toolkit, the GPU check script) or a CUDA GPU on this machine
    (backends.cuda_build_expected): a build without CUDA kernels fails, instead of skipping every cuda case."""
    if not _ext.built_with_cuda():
        why = cuda_build_expected()
        if why is not None:
            pytest.fail(f"{why}, but ffkernels._C was built without CUDA kernels (no toolkit found at build time, "
                        "or FFKERNELS_CUDA=0): every cuda case would skip")
        pytest.skip("ffkernels._C was built without CUDA kernels (no CUDA toolkit at build time or FFKERNELS_CUDA=0)")
    assert _ext.cuda_archs(), "a CUDA build must record the archs it was compiled for"


@pytest.mark.parametrize("env,gpu,fails", [(None, True, True), ("0", True, False), ("1", False, True),
                                           (None, False, False)],
                         ids=["gpu", "gpu-opted-out", "expect-cuda-1", "no-gpu"])
def test_a_gpu_machine_needs_a_cuda_build(monkeypatch, env, gpu, fails):
    """The rule above with a CPU-only build: on a machine with a GPU the suite fails (it used to skip ~1,000 cuda
    cases and pass), unless FFKERNELS_EXPECT_CUDA=0 says a CPU-only build is meant."""
    monkeypatch.setattr(_ext, "loaded", lambda: True)
    monkeypatch.setattr(_ext, "built_with_cuda", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if env is None:
        monkeypatch.delenv("FFKERNELS_EXPECT_CUDA", raising=False)
    else:
        monkeypatch.setenv("FFKERNELS_EXPECT_CUDA", env)
    with pytest.raises(pytest.fail.Exception if fails else pytest.skip.Exception):
        test_cuda_build_when_expected()


def _fake_toolkit(tmp_path):
    root = tmp_path / "toolkit"
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho real\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_toolkit_found_through_a_wrapper_script(tmp_path, monkeypatch):
    sys.path.insert(0, ROOT)
    from tools.cuda_home import find_cuda_home

    root = _fake_toolkit(tmp_path)
    shim = tmp_path / "shim"
    shim.mkdir()
    wrapper = shim / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    assert find_cuda_home() == str(root.resolve())
    # an explicit CUDA_HOME wins; an invalid one is passed over
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing-here"))
    assert find_cuda_home() == str(root.resolve())


def test_missing_extension_falls_back_to_reference_with_a_warning():
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ffkernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import ffkernels
        assert any("ffkernels._C" in str(x.message) for x in w), [str(x.message) for x in w]
        import torch
        assert ffkernels.available_backends() in (["reference"], ["reference", "triton"]), ffkernels.available_backends()
        layer = ffkernels.FFLinear(6, 4)
        assert layer.backend == "reference"
        out = layer.ff_step(torch.randn(3, 6), torch.randn(3, 6))
        assert out.h_pos.shape == (3, 4)
        try:
            ffkernels.FFLinear(6, 4, backend="cpu").backend
        except ffkernels.BackendUnavailableError as e:
            assert "not built" in str(e), e
        else:
            raise AssertionError("backend='cpu' must be refused without _C")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


def test_info_command_reports_the_build(capsys):
    import json

    from ffkernels.cli import main

    main(["info", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["built_with_cuda"] == _ext.built_with_cuda()
    assert info["backends"]["reference"] == "available"
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}
