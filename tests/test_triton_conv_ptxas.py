"""The Triton conv step's GPU path checked on a CPU-only machine, as test_triton_ptxas.py checks the linear one: in a
subprocess without TRITON_INTERPRET, every conv kernel variant (norm or none, bias, p = 1 or 2, each goodness layout,
grad / Adam / SGD with momentum, the split over the rows, fp32 ieee and tf32 dots) compiles for sm_80 and sm_90
(Triton's bundled ptxas); at the default configs (settings.conv_forward_config, conv_weight_grad_config) the forward and
weight-gradient kernels of a step spill no register on sm_90, for fp32/fp16/bf16, at the CNN recipe's layers (issue 20:
1 -> 40 at 28x28, 40 -> 80 at 14x14, 160 -> 320 at 3x3, competitive over 10 class groups), the benchmark's 64 -> 128 at
14x14 hinton layer and an odd one (5x3 kernel, stride, dilation, 3 groups); the divisor's fp64 square root and division
compile to IEEE-rounded PTX (sqrt.rn.f64, div.rn.f64); and the fused conv steps are triton_ops whose functionalized
graphs launch their kernels (C0, C1, C2, C2b, C3; 3b per parameter with a split). The torch.autocast variants (GEMM =
1: kernel C0b's bf16 x̂, the bf16 W, float32 parameters, h and state) likewise: they compile, their dots are bf16
tensor-core MMAs, C0b rounds with cvt.rn.bf16, no spills at the shapes above, and the autocast steps trace into C0b too.
"""
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
    from ffkernels._types import ConvGeometry
    from ffkernels.config import FFConfig
    from ptxas_compile import compile_for, resources  # tests/ptxas_compile.py
    pkg = "{package}"
    m = {{name: importlib.import_module(f"{{pkg}}.{{name}}") for name in
         ("ops", "conv_ops", "conv_norm_kernel", "conv_forward_kernel", "conv_loss_kernel", "conv_weight_grad_kernel",
          "conv_problem", "optim_args", "settings", "gemm_operands")}}
    settings = m["settings"]
    assert m["ops"].TRACEABLE and not settings.interpreting()
    NO_UPDATE, optim_args = m["optim_args"].NO_UPDATE, m["optim_args"].optim_args
    conv_problem, OVER = m["conv_problem"].conv_problem, m["conv_problem"].OVER_CODES
    f32, f16, bf16, i64 = torch.float32, torch.float16, torch.bfloat16, torch.int64
    adam = FFConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    sgd = FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9)

    # (name, B, C_in, H, W, C_out, (kH, kW), stride, padding, dilation, groups, goodness_over, classes)
    SHAPES = [("1-40-28x28-group", 64, 1, 28, 28, 40, (3, 3), 1, 1, 1, 1, "group", 10),
              ("40-80-14x14-group", 64, 40, 14, 14, 80, (3, 3), 1, 1, 1, 1, "group", 10),
              ("160-320-3x3-group", 64, 160, 3, 3, 320, (3, 3), 1, 1, 1, 1, "group", 10),
              ("64-128-14x14-location", 128, 64, 14, 14, 128, (3, 3), 1, 1, 1, 1, "location", 0),
              ("21-39-15x13-k5x3-s2-d2-g3-sample", 32, 21, 15, 13, 39, (5, 3), 2, 1, 2, 3, "sample", 0)]

    def problem(shape, dt=f32):
        _, B, c_in, H, W, c_out, k, s, p, d, groups, over, classes = shape
        x = torch.empty(B, c_in, H, W, device="meta", dtype=dt)
        w = torch.empty(c_out, c_in // groups, *k, device="meta", dtype=dt)
        return conv_problem(x, w, (s, s), (p, p), (d, d), groups, 1 if over == "group" else 2, over, classes)

    # gemm=1: the torch.autocast variant (settings.gemm_code on a GPU): bf16 x̂ and W operands, float32 parameters
    # (``dt``) and h, norm "none" (kernel C0b divided x), the conv configs of the float32 weight (forward) / bf16 (C3)
    def forward(arch, dt, pr, norm=2, power=2, bias=True, prec="ieee", gemm=0):
        op = bf16 if gemm else dt
        norm = 0 if gemm else norm
        cfg = settings.conv_forward_config(op, pr.cg_out, pr.kg, pr.B * pr.P)
        per_group, tiles, J = pr.partial_layout(cfg["n"])
        return compile_for(m["conv_forward_kernel"].ff_conv_forward_kernel, arch, cfg["warps"], xp_ptr=op, xn_ptr=op,
                           w_ptr=op, b_ptr=dt if bias else None, den_ptr=f32 if norm else None, hp_ptr=dt, hn_ptr=dt,
                           part_ptr=f32, B=pr.B, **pr.geometry_args(), cg_in=pr.cg_in, cg_out=pr.cg_out, kg=pr.kg,
                           tiles_per_group=per_group, J=J, per_class=pr.per_class, sides=pr.sides, NORM=norm,
                           HAS_BIAS=bias, POWER=power, GROUPED=pr.over == "group", INPUT_PRECISION=prec,
                           BLOCK_M=cfg["m"], BLOCK_N=cfg["n"], BLOCK_K=cfg["k"], GEMM=gemm)

    def weight_grad(arch, dt, pr, up, split=False, norm=2, power=2, prec="ieee", gemm=0):
        op = bf16 if gemm else dt
        norm = 0 if gemm else norm
        cfg = settings.conv_weight_grad_config(op, pr.cg_out, pr.kg, pr.B * pr.P)
        grads = f32 if split else (dt if up is NO_UPDATE else None)
        s1 = None if up is NO_UPDATE or (up.optim == 2 and not up.momentum_buffer) else f32
        s2 = f32 if up.optim == 1 else None
        return compile_for(m["conv_weight_grad_kernel"].ff_conv_weight_grad_kernel, arch, cfg["warps"], xp_ptr=op,
                           xn_ptr=op, hp_ptr=dt, hn_ptr=dt, coef_ptr=f32, den_ptr=f32 if norm else None, loss_ptr=dt,
                           w_ptr=dt, b_ptr=dt, gw_ptr=grads, gb_ptr=grads, s1w_ptr=s1, s2w_ptr=s2, s1b_ptr=s1,
                           s2b_ptr=s2, B=pr.B, **pr.geometry_args(), cg_in=pr.cg_in, cg_out=pr.cg_out, kg=pr.kg,
                           ng=pr.ng, per_class=pr.per_class, sides=pr.sides, splits=3 if split else 1,
                           split_rows=cfg["rows"] * 4 if split else pr.B * pr.P, **up.scalars, NORM=norm,
                           HAS_BIAS=True, POWER=power, OVER=OVER[pr.over], OPTIM=up.optim,
                           MOMENTUM=up.momentum_buffer, SPLIT=split, INPUT_PRECISION=prec, BLOCK_N=cfg["n"],
                           BLOCK_K=cfg["k"], BLOCK_M=cfg["rows"], GEMM=gemm)

    def loss(arch, dt, pr, competitive):
        return compile_for(m["conv_loss_kernel"].ff_conv_loss_kernel, arch, part_ptr=f32, gp_ptr=dt, gn_ptr=dt,
                           coef_ptr=f32, target_ptr=i64 if competitive else None, loss_part_ptr=f32, B=pr.B, P=pr.P,
                           ng=pr.ng, rp=pr.sides * pr.B * pr.P, tiles=3, summed=pr.summed, threshold=1.0,
                           threshold_neg=1.5, symba_alpha=4.0, scff_lambda=0.1, temperature=0.5,
                           per_class=pr.per_class, cg_out=pr.cg_out,
                           tiles_per_group=3, tile_n=16, J=2, OVER=OVER[pr.over], GOODNESS=1, LOSS=1, POWER=2,
                           COMPETITIVE=competitive, BLOCK_G=16 if pr.over != "location" else 256, BLOCK_P=256)

    # 1. every variant compiles for sm_80 and sm_90
    for arch, dt, norm, power, prec in ((90, f32, 2, 2, "ieee"), (80, bf16, 0, 1, "ieee"), (80, f32, 1, 2, "tf32")):
        for shape in (SHAPES[0], SHAPES[4]):
            pr = problem(shape, dt)
            forward(arch, dt, pr, norm, power, bias=norm != 0, prec=prec)
            for up in (NO_UPDATE, optim_args(3, adam), optim_args(3, sgd)):
                for split in (False, True):
                    weight_grad(arch, dt, pr, up, split, norm, power, prec)
    for arch in (80, 90):  # the autocast variants: bf16 tensor-core dots; C0b rounds to nearest even (cvt.rn)
        for shape in (SHAPES[0], SHAPES[4]):
            pr = problem(shape)
            ptx = [forward(arch, f32, pr, power=1, gemm=1).asm["ptx"]]
            for up in (NO_UPDATE, optim_args(3, adam), optim_args(3, sgd)):
                for split in (False, True):
                    ptx.append(weight_grad(arch, f32, pr, up, split, gemm=1).asm["ptx"])
            for code in ptx:
                assert ".bf16.bf16" in code, code[-2000:]
        for norm in (2, 0):
            c0b = compile_for(m["gemm_operands"].ff_conv_gemm_normalize_kernel, arch, xp_ptr=f32, xn_ptr=f32,
                              den_ptr=f32 if norm else None, out_ptr=bf16, B=64, numel=784, NORM=norm, GEMM=1,
                              BLOCK=1024).asm["ptx"]
            assert "cvt.rn.bf16" in c0b, c0b[-2000:]  # cvt.rn.bf16x2.f32 (pairs) or cvt.rn.bf16.f32
    for arch, dt in ((90, bf16), (80, f32)):
        for shape in SHAPES[:1] + SHAPES[3:]:
            loss(arch, dt, problem(shape, dt), shape[11] == "group")
        norm = compile_for(m["conv_norm_kernel"].ff_conv_norm_kernel, arch, xp_ptr=dt, xn_ptr=dt, den_ptr=f32, B=64,
                           numel=784, norm_eps=1e-8, NORM=2, BLOCK=1024)
        ptx = norm.asm["ptx"]  # the divisor's fp64 square root and division are IEEE-rounded (ff_math.py)
        assert "sqrt.rn.f64" in ptx and "div.rn.f64" in ptx and "approx.f64" not in ptx, ptx
        compile_for(m["conv_loss_kernel"].ff_conv_loss_sum_kernel, arch, loss_part_ptr=f32, loss_ptr=dt, B=64,
                    BLOCK=64)
    print("compiled")

    # 2. registers and spills on sm_90 at the default configs
    rows = []
    for dt in (f32, f16, bf16):
        for shape in SHAPES:
            pr = problem(shape, dt)
            rows.append(("C1 forward", dt, shape[0], resources(forward(90, dt, pr))))
            rows.append(("C3 adam", dt, shape[0], resources(weight_grad(90, dt, pr, optim_args(3, adam)))))
        for shape in (SHAPES[0], SHAPES[3]):
            pr = problem(shape, dt)
            for name, up, split in (("C3 sgd momentum", optim_args(3, sgd), False), ("C3 grad", NO_UPDATE, False),
                                    ("C3 split partials", optim_args(3, adam), True)):
                rows.append((name, dt, shape[0], resources(weight_grad(90, dt, pr, up, split))))
        pr = problem(SHAPES[1], dt)
        rows.append(("C2 competitive", dt, SHAPES[1][0], resources(loss(90, dt, pr, True))))
    for shape in SHAPES:  # torch.autocast: bf16 convolutions on float32 parameters
        pr = problem(shape)
        rows.append(("C1 forward, autocast", f32, shape[0], resources(forward(90, f32, pr, gemm=1))))
        rows.append(("C3 adam, autocast", f32, shape[0], resources(weight_grad(90, f32, pr, optim_args(3, adam),
                                                                               gemm=1))))
    for shape in (SHAPES[0], SHAPES[3]):
        pr = problem(shape)
        for name, up, split in (("C3 sgd momentum, autocast", optim_args(3, sgd), False),
                                ("C3 grad, autocast", NO_UPDATE, False),
                                ("C3 split partials, autocast", optim_args(3, adam), True)):
            rows.append((name, f32, shape[0], resources(weight_grad(90, f32, pr, up, split, gemm=1))))
    rows.append(("C1 forward, tf32", f32, SHAPES[3][0], resources(forward(90, f32, problem(SHAPES[3]), prec="tf32"))))
    for name, dt, shape, (regs, st, ld) in rows:
        print(f"resources {{name:28}} {{str(dt):15}} {{shape:34}} {{regs:4}} registers {{st:6}} B spill stores "
              f"{{ld:6}} B spill loads")
    spilled = [r for r in rows if r[3][1] or r[3][2]]
    assert not spilled, spilled
    print("no spills")

    # 3. the fused conv steps trace into their launches (with a split over the rows: kernel 3b once per parameter)
    backend = importlib.import_module(pkg).TritonBackend()
    for loss_name, norm, splits, update, gemm in (("hinton", "rms", 1, True, 0), ("competitive", "none", 1, True, 0),
                                                  ("symba", "l2", 2, True, 0), ("competitive", "rms", 2, False, 0),
                                                  ("hinton", "rms", 1, True, 1), ("competitive", "none", 2, True, 1)):
        over = "group" if loss_name == "competitive" else "location"
        cfg = FFConfig(loss=loss_name, goodness_over=over, norm=norm, threshold=3.0,
                       gemm_dtype="bfloat16" if gemm else "param")
        competitive = loss_name == "competitive"
        graphs = []
        def keep(gm, inputs):
            graphs.append(gm.code)
            return gm
        def step(x_pos, x_neg, t, w, b, s1w, s2w, s1b, s2b):
            geom = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
            nc = 2 if competitive else 0
            if update:
                return tuple(v for v in backend.conv_step(x_pos, None if competitive else x_neg,
                                                          t if competitive else None, w, b, (s1w, s2w), (s1b, s2b), 3,
                                                          geom, nc, cfg) if v is not None)
            return tuple(v for v in backend.conv_grad(x_pos, None if competitive else x_neg,
                                                      t if competitive else None, w, b, geom, nc, cfg)
                         if v is not None)
        with settings.force_row_splits(splits), FakeTensorMode():
            shapes = [(7, 3, 9, 8), (7, 3, 9, 8), None, (6, 3, 3, 3), (6,), (6, 3, 3, 3), (6, 3, 3, 3), (6,), (6,)]
            args = [torch.empty(s, device="cuda") if s else torch.zeros(7, dtype=i64, device="cuda") for s in shapes]
            aot_function(step, fw_compiler=keep)(*args)
        code = graphs[0]
        want = (4 if norm == "none" else 5) + (2 if splits > 1 else 0) + gemm  # + C0b under autocast
        assert code.count("triton_kernel_wrapper_functional(") == want, (loss_name, norm, splits, code)
    print("traced")
""").format(package=TRITON_PACKAGE)


@pytest.mark.skipif(INTERPRET, reason="needs the kernels as real JIT functions: run without TRITON_INTERPRET")
def test_conv_gpu_path_compiles_without_spills_and_is_traceable():
    r = run_script(SCRIPT)
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith("resources")))  # shown with -s
    assert r.returncode == 0 and [ln for ln in r.stdout.split("\n") if ln and not ln.startswith("resources")] == [
        "compiled", "no spills", "traced"], (r.stdout[-6000:], r.stderr[-4000:])
