"""The Triton GPU path checked on a CPU-only machine, in a subprocess without TRITON_INTERPRET: every kernel variant
(with and without peer normalization's code) compiles to sm_80/sm_90 code (Triton's bundled ptxas), and the fused
step is a triton_op whose functionalized graph launches the three kernels (what torch.compile/inductor sees), with
peer normalization too (the three compiled with it, r written by the third)."""
import os
import subprocess
import sys
import textwrap

import pytest

import ffkernels
from backends import INTERPRET, TRITON_PACKAGE

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent("""
    import importlib
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ffkernels.config import FFConfig
    pkg = "{package}"
    kernels = {{name: importlib.import_module(f"{{pkg}}.{{name}}") for name in
               ("ops", "forward_kernel", "loss_kernel", "optim_args", "update_kernel", "weight_grad_kernel")}}
    ff_forward_kernel = kernels["forward_kernel"].ff_forward_kernel
    ff_loss_kernel, peer_scalars = kernels["loss_kernel"].ff_loss_kernel, kernels["loss_kernel"].peer_scalars
    NO_UPDATE, optim_args = kernels["optim_args"].NO_UPDATE, kernels["optim_args"].optim_args
    ff_update_kernel = kernels["update_kernel"].ff_update_kernel
    ff_weight_grad_kernel = kernels["weight_grad_kernel"].ff_weight_grad_kernel
    assert kernels["ops"].TRACEABLE

    PTR = {{torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}}
    def compile_for(kernel, arch, **args):  # signature from example arguments: dtype = a pointer to it
        sig, const = {{}}, {{}}
        for p, name in zip(kernel.params, kernel.arg_names):
            v = args[name]
            if p.is_constexpr or v is None:
                sig[name], const[name] = "constexpr", v
            else:
                sig[name] = PTR.get(v) or {{bool: "i1", int: "i32", float: "fp32"}}[type(v)]
        triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32))

    f32, bf16 = torch.float32, torch.bfloat16
    for peer in (False, True):  # every kernel of the step without and with peer normalization's code
        p = f32 if peer else None
        for arch, dt, norm, prec in ((90, f32, 2, "ieee"), (80, bf16, 0, "ieee"), (80, f32, 1, "tf32")):
            compile_for(ff_forward_kernel, arch, xp_ptr=dt, xn_ptr=dt, w_ptr=dt, b_ptr=dt if norm else None,
                        hp_ptr=dt, hn_ptr=dt, ss_part_ptr=f32, den_ptr=f32, colsum_part_ptr=p, B=70, N=90, K=100,
                        norm_eps=1e-8, NORM=norm, HAS_BIAS=bool(norm), PEER=peer, INPUT_PRECISION=prec, BLOCK_M=64,
                        BLOCK_N=64, BLOCK_K=32)
        for arch, dt in ((90, bf16), (80, f32)):
            compile_for(ff_loss_kernel, arch, ss_part_ptr=f32, gp_ptr=dt, gn_ptr=dt, coef_ptr=f32, loss_ptr=dt,
                        colsum_part_ptr=p, r_ptr=p, r_new_ptr=p, v_ptr=p, B=70, N=90, num_tiles=2, threshold=1.0,
                        symba_alpha=4.0, num_m_tiles=2, **peer_scalars(70, 90, 0.5 if peer else 0.0, 0.9),
                        GOODNESS=1, LOSS=1, PEER=peer, BLOCK=128, BLOCK_UNITS=128)
        adam = FFConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        sgd = FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9)
        for arch, dt, up in ((90, f32, NO_UPDATE), (90, bf16, optim_args(3, adam)), (80, f32, optim_args(3, sgd))):
            grads = dt if up is NO_UPDATE else None
            compile_for(ff_weight_grad_kernel, arch, xp_ptr=dt, xn_ptr=dt, hp_ptr=dt, hn_ptr=dt, coef_ptr=f32,
                        den_ptr=f32, loss_ptr=dt, v_ptr=p, r_new_ptr=p, r_ptr=p, w_ptr=dt, b_ptr=dt, gw_ptr=grads,
                        gb_ptr=grads, s1w_ptr=f32, s2w_ptr=f32, s1b_ptr=f32, s2b_ptr=f32, B=70, N=90, K=100,
                        **up.scalars, NORM=2, HAS_BIAS=True, OPTIM=up.optim, MOMENTUM=up.momentum_buffer, PEER=peer,
                        INPUT_PRECISION="ieee", BLOCK_N=64, BLOCK_K=32, BLOCK_B=32)
    up = optim_args(1, FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.01))
    compile_for(ff_update_kernel, 90, p_ptr=bf16, g_ptr=bf16, s1_ptr=f32, s2_ptr=None, loss_ptr=bf16, numel=1000,
                **up.scalars, OPTIM=up.optim, MOMENTUM=True, HAS_LOSS=True, BLOCK=1024)
    print("compiled")

    backend = importlib.import_module(pkg).TritonBackend()
    for peer in (False, True):
        cfg = FFConfig(threshold=19.0, peer_norm=0.5 if peer else 0.0)
        graphs = []
        def keep(gm, inputs):
            graphs.append(gm.code)
            return gm
        def step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, r):
            return tuple(backend.step(x_pos, x_neg, w, b, (s1w, s2w), (s1b, s2b), 3, cfg, peer_mean=r))
        with FakeTensorMode():
            shapes = [(7, 33), (7, 33), (19, 33), (19,), (19, 33), (19, 33), (19,), (19,), (19,)]
            aot_function(step, fw_compiler=keep)(*[torch.empty(s, device="cuda") for s in shapes])
        code = graphs[0]
        assert code.count("triton_kernel_wrapper_functional(") == 3, code
        assert code.count("'PEER': True") == (3 if peer else 0), code  # kernels 1-3 with the peer code
        if peer:
            assert "triton_kernel_wrapper_functional_proxy_2['r_ptr']" in code, code  # r: an output of kernel 3
    print("traced")
""").format(package=TRITON_PACKAGE)


@pytest.mark.skipif(INTERPRET, reason="needs the kernels as real JIT functions: run without TRITON_INTERPRET")
def test_gpu_path_compiles_and_is_traceable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ffkernels.__file__)),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split() == ["compiled", "traced"], (r.stdout, r.stderr[-4000:])
