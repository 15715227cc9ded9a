"""Compiling Triton kernels for a GPU on a machine without one, for the ptxas tests (test_triton_ptxas.py,
test_triton_conv_ptxas.py). Their scripts run in a subprocess without TRITON_INTERPRET (the kernels must be real JIT
functions) and import this module there (``run_script``); importing it imports triton.

``compile_for(kernel, arch, num_warps, **args)`` compiles a ``@triton.jit`` kernel for sm_<arch> from example
arguments (a torch dtype = a pointer to it; None and constexprs as constants); ``resources(compiled)`` reads the
registers and spill bytes ptxas reports (-v) for the PTX Triton generated.
"""
import os
import re
import subprocess
import sys
import tempfile

import torch

PTR = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
       torch.int64: "*i64"}


def compile_for(kernel, arch, num_warps=4, **args):
    """Signature from example arguments: a dtype = a pointer to it. Like the JIT's specialization, pointers are 16-byte
    aligned and ints that are multiples of 16 are marked so (what vectorizes the loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, const, attrs = {}, {}, {}
    for i, (p, name) in enumerate(zip(kernel.params, kernel.arg_names)):
        v = args[name]
        if p.is_constexpr or v is None:
            sig[name], const[name] = "constexpr", v
        else:
            sig[name] = PTR.get(v) or {bool: "i1", int: "i32", float: "fp32"}[type(v)]
            if v in PTR or (type(v) is int and v % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def resources(compiled, arch=90):
    """(registers, spill store bytes, spill load bytes) of the kernel as ptxas reports them (-v)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spills.group(1)), int(spills.group(2))


def run_script(script: str, timeout: int = 1200):
    """Run ``script`` in a fresh Python without TRITON_INTERPRET, with the package root and this folder importable;
    returns the CompletedProcess."""
    import ffkernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ffkernels.__file__)),
                                         os.path.dirname(os.path.abspath(__file__)), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
