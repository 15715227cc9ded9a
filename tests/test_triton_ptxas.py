"""The Triton GPU path checked on a CPU-only machine, in a subprocess without TRITON_INTERPRET: every kernel variant
(with and without peer normalization's code, the split over the rows, the labeled first layer) compiles to
sm_80/sm_90 code (Triton's bundled ptxas); at the default configs (settings.forward_config, weight_grad_config) the
kernels of a step use no more than 255 registers and spill none, for fp32/fp16/bf16 at widths that are multiples of
16 (N = K = 2048) and widths that are not (N = K = 1000); and the fused steps are triton_ops whose functionalized
graphs launch their three kernels (what torch.compile/inductor sees), with peer normalization too (the three compiled
with it, r written by the third). The torch.autocast variants (GEMM = 1: bf16 x̂ and W, fp32 weights, h and state;
kernel 0 writing x̂) likewise: they compile, their dots are bf16 tensor-core MMAs, kernel 0 rounds with cvt.rn.bf16,
they spill nothing at the default configs, and the autocast steps trace into kernel 0 + their three launches."""
import textwrap

import pytest

from backends import INTERPRET, TRITON_PACKAGE
from ptxas_compile import run_script

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent("""
    import importlib
    import torch
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ffkernels.config import FFConfig
    pkg = "{package}"
    kernels = {{name: importlib.import_module(f"{{pkg}}.{{name}}") for name in
               ("ops", "labeled", "forward_kernel", "forward_labeled_kernel", "loss_kernel", "optim_args",
                "update_kernel", "weight_grad_kernel", "settings", "gemm_operands")}}
    ff_forward_kernel = kernels["forward_kernel"].ff_forward_kernel
    ff_forward_labeled_kernel = kernels["forward_labeled_kernel"].ff_forward_labeled_kernel
    ff_loss_kernel, peer_scalars = kernels["loss_kernel"].ff_loss_kernel, kernels["loss_kernel"].peer_scalars
    NO_UPDATE, optim_args = kernels["optim_args"].NO_UPDATE, kernels["optim_args"].optim_args
    ff_update_kernel = kernels["update_kernel"].ff_update_kernel
    wg = kernels["weight_grad_kernel"]
    settings = kernels["settings"]
    assert kernels["ops"].TRACEABLE and not settings.interpreting()

    from ptxas_compile import compile_for, resources  # tests/ptxas_compile.py

    f32, f16, bf16, i64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
    adam = FFConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    sgd = FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9)

    # gemm=1: the torch.autocast variant (settings.gemm_code on a GPU): x̂ and W bf16 operands of fp32 parameters,
    # float32 h and outputs, norm "none" (kernel 0 divided x), bf16's tiles (``dt`` is the parameters' float32)
    def forward(arch, dt, B, N, K, norm=2, peer=False, prec="ieee", cfg=None, gemm=0):
        op = bf16 if gemm else dt
        norm = 0 if gemm else norm
        cfg = cfg or settings.forward_config(op, N, K, B, aligned=N % 16 == 0 and K % 16 == 0)
        return compile_for(ff_forward_kernel, arch, cfg["warps"], xp_ptr=op, xn_ptr=op, w_ptr=op,
                           b_ptr=dt if norm or gemm else None, hp_ptr=dt, hn_ptr=dt, ss_part_ptr=f32,
                           den_ptr=None if gemm else f32, colsum_part_ptr=f32 if peer else None, B=B, N=N, K=K,
                           norm_eps=1e-8, NORM=norm, HAS_BIAS=bool(norm or gemm), PEER=peer, INPUT_PRECISION=prec,
                           BLOCK_M=cfg["m"], BLOCK_N=cfg["n"], BLOCK_K=cfg["k"], GEMM=gemm)

    def forward_labeled(arch, dt, B, N, K, norm=2, peer=False, gemm=0):
        op = bf16 if gemm else dt
        norm = 0 if gemm else norm
        cfg = settings.forward_config(op, N, K, B, aligned=N % 16 == 0 and K % 16 == 0, labeled=True)
        return compile_for(ff_forward_labeled_kernel, arch, cfg["warps"], x_ptr=op, yp_ptr=i64, yn_ptr=i64, w_ptr=op,
                           b_ptr=dt if norm or gemm else None, hp_ptr=dt, hn_ptr=dt, ss_part_ptr=f32, den_ptr=f32,
                           colsum_part_ptr=f32 if peer else None, B=B, N=N, K=K, C=10, label_value=1.0, norm_eps=1e-8,
                           NORM=norm, HAS_BIAS=bool(norm or gemm), PEER=peer, INPUT_PRECISION="ieee",
                           BLOCK_M=cfg["m"], BLOCK_N=cfg["n"], BLOCK_K=cfg["k"], GEMM=gemm)

    def weight_grad(arch, dt, B, N, K, up, peer=False, split=False, labeled=False, norm=2, prec="ieee", gemm=0):
        op = bf16 if gemm else dt
        norm = 0 if gemm else norm
        cfg = settings.weight_grad_config(op, N, K, B, aligned=N % 16 == 0 and K % 16 == 0, labeled=labeled,
                                          autocast=bool(gemm))
        p = f32 if peer else None
        grads = f32 if split else (dt if up is NO_UPDATE else None)
        return compile_for(wg.ff_weight_grad_kernel, arch, cfg["warps"], xp_ptr=op, xn_ptr=op, hp_ptr=dt, hn_ptr=dt,
                           coef_ptr=f32, den_ptr=f32, loss_ptr=dt, v_ptr=p, r_new_ptr=p, r_ptr=p, w_ptr=dt, b_ptr=dt,
                           gw_ptr=grads, gb_ptr=grads, s1w_ptr=f32, s2w_ptr=f32, s1b_ptr=f32, s2b_ptr=f32,
                           yp_ptr=i64 if labeled else None, yn_ptr=i64 if labeled else None, B=B, N=N, K=K,
                           split_rows=cfg["rows"] * 2 if split else B, C=10, label_value=1.0, **up.scalars,
                           NORM=norm, HAS_BIAS=True, OPTIM=up.optim, MOMENTUM=up.momentum_buffer, PEER=peer,
                           SPLIT=split, LABELED=labeled, INPUT_PRECISION=prec, BLOCK_N=cfg["n"], BLOCK_K=cfg["k"],
                           BLOCK_B=cfg["rows"], GEMM=gemm)

    # 1. every kernel variant compiles for sm_80 and sm_90
    for peer in (False, True):  # every kernel of the step without and with peer normalization's code
        p = f32 if peer else None
        for arch, dt, norm, prec in ((90, f32, 2, "ieee"), (80, bf16, 0, "ieee"), (80, f32, 1, "tf32")):
            forward(arch, dt, 70, 90, 100, norm, peer, prec, cfg=dict(m=64, n=64, k=32, warps=4))
            forward_labeled(arch, dt, 70, 90, 100, norm, peer)
        for arch, dt, loss in ((90, bf16, 1), (80, f32, 3)):  # symba; scff (hinton's code with its two additions)
            compile_for(ff_loss_kernel, arch, ss_part_ptr=f32, gp_ptr=dt, gn_ptr=dt, coef_ptr=f32, loss_ptr=dt,
                        colsum_part_ptr=p, r_ptr=p, r_new_ptr=p, v_ptr=p, B=70, N=90, num_tiles=2, threshold=1.0,
                        threshold_neg=1.5, symba_alpha=4.0, scff_lambda=0.1, num_m_tiles=2,
                        **peer_scalars(70, 90, 0.5 if peer else 0.0, 0.9),
                        GOODNESS=1, LOSS=loss, PEER=peer, BLOCK=128, BLOCK_UNITS=128)
        for arch, dt, up, norm in ((90, f32, NO_UPDATE, 2), (90, bf16, optim_args(3, adam), 0),
                                   (80, f32, optim_args(3, sgd), 1)):
            for split in (False, True):
                for labeled in (False, True):
                    weight_grad(arch, dt, 70, 90, 100, up, peer, split, labeled, norm)
        for arch in (80, 90):  # the autocast variants: bf16 tensor-core dots (mma / wgmma on bf16 operands)
            ptx = [forward(arch, f32, 70, 90, 100, peer=peer, gemm=1).asm["ptx"],
                   forward_labeled(arch, f32, 70, 90, 100, peer=peer, gemm=1).asm["ptx"]]
            for up in (NO_UPDATE, optim_args(3, adam), optim_args(3, sgd)):
                for split in (False, True):
                    for labeled in (False, True):
                        ptx.append(weight_grad(arch, f32, 70, 90, 100, up, peer, split, labeled, gemm=1).asm["ptx"])
            for code in ptx:
                assert ".bf16.bf16" in code, code[-2000:]
    for arch, dt, up, gemm in ((90, bf16, optim_args(3, adam), 0), (80, f32, NO_UPDATE, 0),
                               (90, f16, optim_args(2, sgd), 0), (90, f32, optim_args(3, adam), 1),
                               (80, f32, NO_UPDATE, 1)):
        for commit in (False, True):
            compile_for(wg.ff_split_reduce_kernel, arch, part_ptr=f32, splits=3, numel=1000, p_ptr=dt, g_ptr=dt,
                        s1_ptr=f32, s2_ptr=f32 if up.optim == 1 else None, loss_ptr=dt, r_new_ptr=f32 if commit else None,
                        r_ptr=f32 if commit else None, n_r=90, **up.scalars, OPTIM=up.optim,
                        MOMENTUM=up.momentum_buffer, PEER_COMMIT=commit, BLOCK=wg.REDUCE_BLOCK, GEMM=gemm)
    for arch in (80, 90):  # kernel 0: x / d (div.rn) rounded to bf16 to nearest even (cvt.rn)
        for norm, labeled in ((2, False), (1, True), (0, False)):
            k0 = compile_for(kernels["gemm_operands"].ff_gemm_normalize_kernel, arch, xp_ptr=f32, xn_ptr=f32,
                             out_ptr=bf16, lv_ptr=f32 if labeled else None, B=64, K=784, C=10, label_value=1.0,
                             norm_eps=1e-8, NORM=norm, LABELED=labeled, GEMM=1, BLOCK=1024).asm["ptx"]
            assert "cvt.rn.bf16" in k0 and ("div.rn.f32" in k0 or norm == 0), k0[-2000:]  # bf16x2 or bf16
    up = optim_args(1, FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.01))
    compile_for(ff_update_kernel, 90, p_ptr=bf16, g_ptr=bf16, s1_ptr=f32, s2_ptr=None, loss_ptr=bf16, numel=1000,
                **up.scalars, OPTIM=up.optim, MOMENTUM=True, HAS_LOSS=True, BLOCK=1024)
    print("compiled")

    # 2. registers and spills on sm_90 at the default configs
    rows = []
    for dt in (f32, f16, bf16):
        for B, N, K in ((256, 2048, 2048), (256, 1000, 1000)):
            shape = f"{{B}}x{{N}}x{{K}}"
            rows.append(("kernel 1, peer", dt, shape, resources(forward(90, dt, B, N, K, peer=True))))
            rows.append(("kernel 1L, peer", dt, shape, resources(forward_labeled(90, dt, B, N, K, peer=True))))
            for name, up, peer, split, labeled in (("adam, peer", optim_args(3, adam), True, False, False),
                                                   ("sgd momentum", optim_args(3, sgd), False, False, False),
                                                   ("grad", NO_UPDATE, True, False, False),
                                                   ("split partials", optim_args(3, adam), True, True, False),
                                                   ("labeled, adam, peer", optim_args(3, adam), True, False, True)):
                rows.append((f"kernel 3, {{name}}", dt, shape,
                             resources(weight_grad(90, dt, B, N, K, up, peer, split, labeled))))
            if dt == f32:  # torch.autocast: bf16 GEMMs on float32 parameters
                rows.append(("kernel 1, peer, autocast", dt, shape, resources(forward(90, dt, B, N, K, peer=True,
                                                                                      gemm=1))))
                rows.append(("kernel 1L, peer, autocast", dt, shape,
                             resources(forward_labeled(90, dt, B, N, K, peer=True, gemm=1))))
                for name, up, peer, split, labeled in (("adam, peer", optim_args(3, adam), True, False, False),
                                                       ("sgd momentum", optim_args(3, sgd), False, False, False),
                                                       ("grad", NO_UPDATE, True, False, False),
                                                       ("split partials", optim_args(3, adam), True, True, False),
                                                       ("labeled, adam, peer", optim_args(3, adam), True, False, True)):
                    rows.append((f"kernel 3, {{name}}, autocast", dt, shape,
                                 resources(weight_grad(90, dt, B, N, K, up, peer, split, labeled, gemm=1))))
        if dt == f32:  # set_fp32_precision("tf32")
            rows.append(("kernel 3, adam, peer, tf32", dt, "256x2048x2048",
                         resources(weight_grad(90, dt, 256, 2048, 2048, optim_args(3, adam), True, prec="tf32"))))
    for name, dt, shape, (regs, st, ld) in rows:
        print(f"resources {{name:38}} {{str(dt):15}} {{shape:14}} {{regs:4}} registers {{st:6}} B spill stores "
              f"{{ld:6}} B spill loads")
    spilled = [r for r in rows if r[3][1] or r[3][2]]
    assert not spilled, spilled
    print("no spills")

    # 3. the fused steps trace into their launches (with a split over the rows: kernel 3b once per parameter)
    backend = importlib.import_module(pkg).TritonBackend()
    for labeled, peer, splits, gemm in ((False, False, 1, 0), (False, True, 1, 0), (True, False, 1, 0),
                                        (True, True, 1, 0), (False, True, 2, 0), (True, True, 2, 0),
                                        (False, True, 1, 1), (True, True, 1, 1), (False, True, 2, 1)):
        B = 7 if splits == 1 else 300
        with settings.force_row_splits(splits):
            cfg = FFConfig(threshold=19.0, peer_norm=0.5 if peer else 0.0,
                           gemm_dtype="bfloat16" if gemm else "param")
            graphs = []
            def keep(gm, inputs):
                graphs.append(gm.code)
                return gm
            def step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, r, yp, yn):
                if labeled:
                    return tuple(backend.step_labeled(x_pos, yp, yn, 5, 1.0, w, b, (s1w, s2w), (s1b, s2b), 3, cfg,
                                                      peer_mean=r))
                return tuple(backend.step(x_pos, x_neg, w, b, (s1w, s2w), (s1b, s2b), 3, cfg, peer_mean=r))
            with FakeTensorMode():
                shapes = [(B, 33), (B, 33), (19, 33), (19,), (19, 33), (19, 33), (19,), (19,), (19,)]
                args = [torch.empty(s, device="cuda") for s in shapes]
                args += [torch.zeros(B, dtype=torch.int64, device="cuda")] * 2
                aot_function(step, fw_compiler=keep)(*args)
            code = graphs[0]
            # kernel 0 under autocast, then kernels 1-3 (3b twice with a split)
            assert code.count("triton_kernel_wrapper_functional(") == (3 if splits == 1 else 5) + gemm, code
            assert code.count("'GEMM': 1") == (3 + (splits > 1) if gemm else 0), code  # 0, 1, 3 (3b of W)
            assert code.count("'PEER': True") == (3 if peer else 0), code  # kernels 1-3 with the peer code
            assert code.count("'LABELED': True") == ((1 + gemm) if labeled else 0), code  # kernel 3 (and 0)
            if peer:  # r: an output of kernel 3 (of 3b for the weight with a split)
                writer = (2 if splits == 1 else 3) + gemm
                assert f"triton_kernel_wrapper_functional_proxy_{{writer}}['r_ptr']" in code, code
    print("traced")
""").format(package=TRITON_PACKAGE)


@pytest.mark.skipif(INTERPRET, reason="needs the kernels as real JIT functions: run without TRITON_INTERPRET")
def test_gpu_path_compiles_without_spills_and_is_traceable():
    r = run_script(SCRIPT)
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith("resources")))  # shown with -s
    assert r.returncode == 0 and [ln for ln in r.stdout.split("\n") if ln and not ln.startswith("resources")] == [
        "compiled", "no spills", "traced"], (r.stdout[-6000:], r.stderr[-4000:])
