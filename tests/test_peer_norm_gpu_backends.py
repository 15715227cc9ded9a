"""Peer normalization (docs/design.md, "The math") in the Triton and CUDA kernels, against the oracle.

    TRITON_INTERPRET=1 python -m pytest tests/test_peer_norm_gpu_backends.py    # Triton on the CPU
    python -m pytest tests/test_peer_norm_gpu_backends.py                         # compile check; GPU tests

Under the Triton interpreter (the variable must be set before triton is imported, so the module does not set
it itself) the fused Triton step with peer_norm > 0 is compared with the reference backend (autograd +
torch.optim) over several steps: loss, h, g, weight, bias, optimizer state and the running mean r after
every step, with the float32 rule of tests/helpers.py (error against a float64 oracle at most 4x the float32
oracle's own error plus 1e-5 relative). Also: a non-finite loss (from x or from the peer term alone) leaves r,
weights and state unchanged; peer_norm = 0 runs none of the peer code (an r full of NaN is neither read nor
written); the fused step equals ff_grad + ff_update; opcheck; the argument checks. Without the interpreter,
the peer variants of the kernels compile for sm_80/sm_90 (bundled ptxas, no GPU needed) and ff_step traces
into its three launches. On a GPU (marked ``gpu``) the triton and cuda backends run the same comparisons.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ffkernels
from ffkernels.backends import BACKENDS
from ffkernels.backends.reference import ReferenceBackend
from ffkernels.config import FFConfig

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
HAVE_TRITON = importlib.util.find_spec("triton") is not None
RUN_INTERPRETER = "TRITON_INTERPRET=1 python -m pytest tests/test_peer_norm_gpu_backends.py"

interpreter = pytest.mark.skipif(not (INTERPRET and HAVE_TRITON),
                                 reason=f"Triton interpreter tests: run `{RUN_INTERPRETER}`")
gpu_only = pytest.mark.skipif(not CUDA or INTERPRET, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")

REF = ReferenceBackend()
OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "sgd": dict(optimizer="sgd", lr=0.05),
    "sgd-momentum-wd": dict(optimizer="sgd", lr=0.02, momentum=0.5, weight_decay=0.1),
    "adam-wd": dict(optimizer="adam", lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
}


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """The interpreter runs each program's tl.dot as a small numpy matmul: keep numpy's BLAS on one thread
    (a multi-threaded BLAS on busy cores makes those much slower; see docs/triton.md)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def make_config(goodness="sum", N=1, **kw) -> FFConfig:
    """FFConfig with FFLinear's default threshold for ``goodness`` and width ``N``."""
    return FFConfig(goodness=goodness, threshold=FFConfig.default_threshold(goodness, N), **kw)


def make_params(K, N, bias, seed, device="cpu"):
    """fp64 master copies of an nn.Linear's weight/bias and a non-zero running mean r (so mu r matters)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias, dtype=torch.float64)
    w = lin.weight.detach().to(device).contiguous()
    b = lin.bias.detach().to(device).contiguous() if bias else None
    r = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7)).to(device) * 0.5
    return w, b, r


def make_batch(B, K, gen, device="cpu"):
    xp = torch.randn(B, K, generator=gen, dtype=torch.float64) + 0.3
    xn = 1.5 * torch.randn(B, K, generator=gen, dtype=torch.float64)
    if K == 1:  # normalized, a 1-feature row is just its sign: keep pos and neg apart (as tests/helpers.py does)
        xp, xn = xp.abs(), -xn.abs()
    return xp.to(device), xn.to(device)


class Run:
    """One model's tensors: weight, bias, optimizer state and r, in one dtype (state in the state dtype)."""

    def __init__(self, w, b, r, cfg, dtype):
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        self.w, self.b = w.to(dtype).clone(), (b.to(dtype).clone() if b is not None else None)
        self.st_w = tuple(torch.zeros_like(self.w, dtype=sdt) for _ in cfg.state_names)
        self.st_b = tuple(torch.zeros_like(self.b, dtype=sdt) for _ in cfg.state_names) if b is not None else ()
        self.r = r.to(sdt).clone()
        self.dtype = dtype

    def step(self, backend, xp, xn, step, cfg):
        return backend.step(xp.to(self.dtype), xn.to(self.dtype), self.w, self.b, self.st_w, self.st_b, step, cfg,
                            peer_mean=self.r)

    def tensors(self, cfg):
        """(name, tensor) of everything a step changes."""
        out = [("weight", self.w), ("r", self.r)] + ([("bias", self.b)] if self.b is not None else [])
        out += [(f"{n} of weight", s) for n, s in zip(cfg.state_names, self.st_w)]
        out += [(f"{n} of bias", s) for n, s in zip(cfg.state_names, self.st_b)]
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are all zero), as in tests/helpers.py."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def check_rule(what, ours, ref32, ref64, tol=1e-5):
    """tests/helpers.py's float32 rule: error vs fp64 <= 4 x the fp32 oracle's own error + tol (relative)."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref64.shape)}"
    e_ours, e_ref = rel_err(ours, ref64), rel_err(ref32, ref64)
    assert e_ours <= 4 * e_ref + tol, f"{what}: error vs fp64 {e_ours:.3g} > 4 * {e_ref:.3g} (oracle) + {tol:g}"


def trajectory(backend, B, K, N, bias, cfg, steps=3, seed=0, device="cpu", dtype=torch.float32):
    """``steps`` steps of ``backend`` (name) with the fp32 and fp64 oracles on the same data; compares the
    outputs and every tensor a step changes (r included) after every step. fp64: 1e-11 against the fp64 oracle."""
    w, b, r = make_params(K, N, bias, seed, device)
    ours, o32, o64 = Run(w, b, r, cfg, dtype), Run(w, b, r, cfg, torch.float32), Run(w, b, r, cfg, torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        xp, xn = make_batch(B, K, gen, device)
        outs = [ours.step(BACKENDS[backend], xp, xn, step, cfg), o32.step(REF, xp, xn, step, cfg),
                o64.step(REF, xp, xn, step, cfg)]
        pairs = [(f"step {step} {f}", *ts) for f, *ts in zip(outs[0]._fields, *outs)]
        pairs += [(f"step {step} {n}", a, b_, c) for (n, a), (_, b_), (_, c) in
                  zip(ours.tensors(cfg), o32.tensors(cfg), o64.tensors(cfg))]
        for what, a, r32, r64 in pairs:
            if dtype == torch.float64:
                assert rel_err(a, r64) <= 1e-11, f"{what}: {rel_err(a, r64):.3g}"
            else:
                check_rule(what, a, r32, r64)
    return ours


# ---- Triton under the interpreter: against the oracle ------------------------------------------------------

SHAPES = [(1, 1, 1), (7, 17, 17), (64, 128, 128), (7, 128, 17), (64, 17, 1), (1, 17, 128), (7, 1, 128),
          (64, 128, 17)]  # (B, K, N) with B in {1, 7, 64}, K, N in {1, 17, 128}
COMBOS = [("rms", "sum", "hinton", "adam"), ("l2", "mean", "symba", "sgd"), ("none", "sum", "symba", "adam-wd"),
          ("rms", "mean", "hinton", "sgd-momentum-wd"), ("l2", "sum", "hinton", "sgd"),
          ("rms", "sum", "symba", "sgd-momentum-wd"), ("none", "mean", "hinton", "adam"),
          ("rms", "mean", "symba", "adam")]
PEERS = [(0.5, 0.9), (2.0, 0.5), (0.3, 0.0)]  # (lambda, mu); mu = 0: r' is the batch mean itself
CASES = [(SHAPES[i], COMBOS[i], PEERS[i % len(PEERS)], i % 3 != 2) for i in range(len(SHAPES))]


def case_id(case):
    shape, combo, (lam, mu), bias = case
    return f"{'x'.join(map(str, shape))}-{'-'.join(combo)}-l{lam}-m{mu}-{'bias' if bias else 'nobias'}"


@interpreter
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_triton_step_with_peer_norm_matches_oracle(case):
    (B, K, N), (norm, goodness, loss, opt), (lam, mu), bias = case
    cfg = make_config(goodness, N, norm=norm, loss=loss, peer_norm=lam, peer_momentum=mu, **OPTIMIZERS[opt])
    trajectory("triton", B, K, N, bias, cfg, steps=3, seed=10 * SHAPES.index((B, K, N)))


@interpreter
@pytest.mark.parametrize("shape", [(300, 9, 20), (3, 5, 1100)], ids=["3-M-tiles", "2-unit-blocks"])
def test_triton_peer_norm_reductions_over_several_blocks(shape):
    """B > 128 rows: kernel 1 writes several M-tiles of column sums that kernel 2 adds in order; N > 1024
    units: kernel 2 walks the units in several blocks for r-bar and L_peer."""
    B, K, N = shape
    cfg = make_config("mean", N, norm="rms", loss="hinton", peer_norm=1.0, peer_momentum=0.5, **OPTIMIZERS["adam-wd"])
    trajectory("triton", B, K, N, True, cfg, steps=2, seed=3)


@interpreter
def test_triton_grad_with_peer_norm_matches_oracle_and_reads_r_only():
    B, K, N = 7, 33, 19
    cfg = make_config("sum", N, norm="rms", loss="symba", peer_norm=1.0, peer_momentum=0.5)
    w, b, r = make_params(K, N, True, seed=1)
    xp, xn = make_batch(B, K, torch.Generator().manual_seed(2))
    r32, r_before = r.float(), r.float().clone()
    out = BACKENDS["triton"].grad(xp.float(), xn.float(), w.float(), b.float(), cfg, peer_mean=r32)
    assert torch.equal(r32, r_before), "ff_grad must not write peer_mean"
    o32 = REF.grad(xp.float(), xn.float(), w.float(), b.float(), cfg, peer_mean=r.float())
    o64 = REF.grad(xp, xn, w, b, cfg, peer_mean=r)
    for f, a, e32, e64 in zip(out._fields, out, o32, o64):
        check_rule(f, a, e32, e64)
    # the peer term really is in the loss and the gradient (far above the tolerance)
    off = REF.grad(xp, xn, w, b, cfg.replace(peer_norm=0.0))
    assert rel_err(off.grad_weight, o64.grad_weight) > 1e-3 and rel_err(off.grad_bias, o64.grad_bias) > 1e-3
    assert abs(off.loss.item() - o64.loss.item()) > 1e-3


# ---- the non-finite rule: r, weights and state unchanged ----------------------------------------------------

def _nonfinite_case(backend, device, poison, opt):
    B, K, N = 7, 17, 33
    cfg = make_config("sum", N, norm="rms", peer_norm=0.5, peer_momentum=0.8, **OPTIMIZERS[opt])
    w, b, r = make_params(K, N, True, seed=6, device=device)
    run = Run(w, b, r, cfg, torch.float32)
    gen = torch.Generator().manual_seed(7)
    xp, xn = make_batch(B, K, gen, device)
    run.step(BACKENDS[backend], xp, xn, 1, cfg)  # a finite step first: non-zero state, r moved
    before = [t.clone() for _, t in run.tensors(cfg)]
    xp, xn = make_batch(B, K, gen, device)
    if poison == "nan-input":
        xp[3, 5] = float("nan")
    else:  # the FF loss is finite; r has an inf, so r' does and L_peer = inf - inf = NaN: only the peer term
        run.r[4] = float("inf")
        before = [t.clone() for _, t in run.tensors(cfg)]
    out = run.step(BACKENDS[backend], xp, xn, 2, cfg)
    assert not torch.isfinite(out.loss)
    for (name, t), e in zip(run.tensors(cfg), before):
        assert torch.equal(t, e), f"{name} changed after a non-finite step"


@interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inf - inf on purpose
@pytest.mark.parametrize("opt", ["adam", "sgd-momentum-wd"])
@pytest.mark.parametrize("poison", ["nan-input", "inf-in-r"])
def test_triton_nonfinite_loss_leaves_r_weights_and_state(poison, opt):
    _nonfinite_case("triton", "cpu", poison, opt)


# ---- peer_norm = 0: none of the peer code runs --------------------------------------------------------------

def _lambda_zero_case(backend, device):
    B, K, N = 7, 40, 24
    cfg = make_config("sum", N, norm="rms", loss="symba", **OPTIMIZERS["adam-wd"])
    w, b, r = make_params(K, N, True, seed=8, device=device)
    runs = [Run(w, b, r, cfg, torch.float32) for _ in range(3)]
    runs[1].r.fill_(float("nan"))  # would poison everything if read
    runs[2].r = None
    gen = torch.Generator().manual_seed(9)
    for step in (1, 2):
        xp, xn = make_batch(B, K, gen, device)
        outs = [runs[0].step(BACKENDS[backend], xp, xn, step, cfg),
                runs[1].step(BACKENDS[backend], xp, xn, step, cfg.replace(peer_momentum=0.25)),
                runs[2].step(BACKENDS[backend], xp, xn, step, cfg)]
        grads = [BACKENDS[backend].grad(xp.float(), xn.float(), rr.w, rr.b, cfg, peer_mean=rr.r) for rr in runs]
        for other in (1, 2):
            for f, a, e in zip(outs[0]._fields, outs[other], outs[0]):
                assert torch.equal(a, e), f"step {step} {f}: peer_mean changed a peer_norm=0 step"
            for f, a, e in zip(grads[0]._fields, grads[other], grads[0]):
                assert torch.equal(a, e), f"step {step} grad {f}: peer_mean changed a peer_norm=0 gradient"
            for (n, a), (_, e) in zip(runs[other].tensors(cfg)[:1] + runs[other].tensors(cfg)[2:],
                                      runs[0].tensors(cfg)[:1] + runs[0].tensors(cfg)[2:]):
                assert torch.equal(a, e), f"step {step} {n}"
    assert torch.equal(runs[0].r, r.float()) and runs[1].r.isnan().all(), "peer_mean written with peer_norm=0"


@interpreter
def test_triton_lambda_zero_ignores_peer_mean_bit_for_bit():
    _lambda_zero_case("triton", "cpu")


# ---- the fused step is ff_grad + ff_update; deterministic ----------------------------------------------------

def _step_equals_grad_then_update(backend, device):
    B, K, N = 7, 130, 20  # two K-tiles on GPUs
    cfg = make_config("mean", N, loss="symba", peer_norm=1.5, peer_momentum=0.6, **OPTIMIZERS["sgd-momentum-wd"])
    w, b, r = make_params(K, N, True, seed=5, device=device)
    fused, split, again = (Run(w, b, r, cfg, torch.float32) for _ in range(3))
    gen = torch.Generator().manual_seed(11)
    for step in range(1, 4):
        xp, xn = (t.float() for t in make_batch(B, K, gen, device))
        out = fused.step(BACKENDS[backend], xp, xn, step, cfg)
        assert all(torch.equal(a, e) for a, e in zip(out, again.step(BACKENDS[backend], xp, xn, step, cfg))), \
            "two identical steps differ (not deterministic)"
        r_before = split.r.clone()
        g = BACKENDS[backend].grad(xp, xn, split.w, split.b, cfg, peer_mean=split.r)
        assert torch.equal(split.r, r_before)
        BACKENDS[backend].update(split.w, split.b, g.grad_weight, g.grad_bias, split.st_w, split.st_b, step, cfg,
                                 loss=g.loss)
        for f, a, e in zip(out._fields, out, g):
            assert torch.equal(a, e), f"step {step} {f}"
        for (n, a), (_, e) in zip(fused.tensors(cfg), split.tensors(cfg)):
            if n != "r":
                assert torch.equal(a, e), f"step {step} {n}"
        assert not torch.equal(fused.r, r_before)  # the step committed r'; ff_grad left r alone
        split.r.copy_(fused.r)
        for (n, a), (_, e) in zip(fused.tensors(cfg), again.tensors(cfg)):
            assert torch.equal(a, e), f"step {step} {n}: not deterministic"


@interpreter
def test_triton_step_equals_grad_then_update_with_peer_norm():
    _step_equals_grad_then_update("triton", "cpu")


# ---- FFLinear(backend="triton", peer_norm=...) end to end ------------------------------------------------------

@interpreter
def test_fflinear_triton_peer_norm_matches_reference_layer_and_resumes():
    kw = dict(goodness="sum", loss="hinton", norm="rms", optimizer="adam", lr=1e-2, peer_norm=0.8, peer_momentum=0.7)
    layer = ffkernels.FFLinear(24, 16, backend="triton", **kw)
    oracle = ffkernels.FFLinear(24, 16, backend="reference", **kw)
    truth = ffkernels.FFLinear(24, 16, backend="reference", dtype=torch.float64, **kw)
    oracle.load_state_dict(layer.state_dict())
    truth.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(21)
    for _ in range(3):
        xp, xn = make_batch(10, 24, gen)
        layer.ff_step(xp.float(), xn.float())
        oracle.ff_step(xp.float(), xn.float())
        truth.ff_step(xp, xn)
    assert "peer_mean" in layer.state_dict() and layer.peer_mean.abs().max() > 0
    for name, a in layer.state_dict().items():
        if isinstance(a, torch.Tensor):
            check_rule(name, a, oracle.state_dict()[name], truth.state_dict()[name])
    resumed = ffkernels.FFLinear(24, 16, backend="triton", **kw)
    resumed.load_state_dict(layer.state_dict())
    xp, xn = (t.float() for t in make_batch(10, 24, gen))
    for a, e in zip(resumed.ff_step(xp, xn), layer.ff_step(xp, xn)):
        assert torch.equal(a, e)
    for (name, a), e in zip(resumed.state_dict().items(), layer.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, e), f"{name}: a resumed layer is not bit-exact"


# ---- torch.library: schemas, fakes, checks --------------------------------------------------------------------

def _op_args(device="cpu", peer_norm=0.7):
    cfg = make_config("sum", 19, peer_norm=peer_norm, **OPTIMIZERS["adam"])
    w, b, r = make_params(33, 19, True, seed=50, device=device)
    xp, xn = (t.float() for t in make_batch(7, 33, torch.Generator().manual_seed(51), device))
    run = Run(w, b, r, cfg, torch.float32)
    return cfg, xp, xn, run


@interpreter
def test_triton_schemas_and_opcheck_with_peer_mean():
    ops = torch.ops.ffkernels_triton
    BACKENDS["triton"].ops  # registers them
    grad_schema, step_schema = str(ops.ff_grad.default._schema), str(ops.ff_step.default._schema)
    assert "Tensor? bias, Tensor? peer_mean, str options)" in grad_schema, grad_schema  # read only
    assert "Tensor(a7!)? state2_bias, Tensor(a8!)? peer_mean, SymInt step, str options)" in step_schema, step_schema
    cfg, xp, xn, run = _op_args()
    torch.library.opcheck(ops.ff_grad.default, (xp, xn, run.w, run.b, run.r, cfg.op_options))
    torch.library.opcheck(ops.ff_step.default, (xp, xn, run.w, run.b, *run.st_w, *run.st_b, run.r, 2, cfg.op_options))


@interpreter
def test_triton_peer_mean_argument_checks():
    ops = torch.ops.ffkernels_triton
    BACKENDS["triton"].ops
    cfg, xp, xn, run = _op_args()
    before = [t.clone() for _, t in run.tensors(cfg)]
    step = lambda r: ops.ff_step(xp, xn, run.w, run.b, *run.st_w, *run.st_b, r, 1, cfg.op_options)  # noqa: E731
    with pytest.raises(ValueError, match="needs peer_mean"):
        ops.ff_grad(xp, xn, run.w, run.b, None, cfg.op_options)
    with pytest.raises(ValueError, match="needs peer_mean"):
        step(None)
    with pytest.raises(ValueError, match=r"peer_mean must have shape \(19,\)"):
        ops.ff_grad(xp, xn, run.w, run.b, torch.zeros(18), cfg.op_options)
    with pytest.raises(TypeError, match="peer_mean must be float32 for float32 weights"):
        step(torch.zeros(19, dtype=torch.float64))
    with pytest.raises(ValueError, match="peer_mean must be contiguous"):
        step(torch.zeros(38)[::2])
    for (n, t), e in zip(run.tensors(cfg), before):  # the failed calls changed nothing
        assert torch.equal(t, e), n
    # peer_norm = 0: peer_mean is optional and ignored whatever it is
    cfg0 = cfg.replace(peer_norm=0.0)
    ops.ff_grad(xp, xn, run.w, run.b, torch.zeros(3, dtype=torch.float64), cfg0.op_options)


# ---- the GPU path without a GPU: the peer variants compile for sm_80/sm_90, ff_step traces ---------------------

_COMPILE_SCRIPT = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from torch._functorch.aot_autograd import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from ffkernels.config import FFConfig
    from ffkernels.backends.triton import ops
    from ffkernels.backends.triton.forward_kernel import ff_forward_kernel
    from ffkernels.backends.triton.loss_kernel import ff_loss_kernel, peer_scalars
    from ffkernels.backends.triton.optim_args import NO_UPDATE, optim_args
    from ffkernels.backends.triton.weight_grad_kernel import ff_weight_grad_kernel
    assert ops.TRACEABLE

    PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    def compile_for(kernel, arch, **args):  # signature from example arguments: dtype = a pointer to it
        sig, const = {}, {}
        for p, name in zip(kernel.params, kernel.arg_names):
            v = args[name]
            if p.is_constexpr or v is None:
                sig[name], const[name] = "constexpr", v
            else:
                sig[name] = PTR.get(v) or {bool: "i1", int: "i32", float: "fp32"}[type(v)]
        triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32))

    f32, bf16 = torch.float32, torch.bfloat16
    for peer in (False, True):
        for arch, dt, norm, prec in ((90, f32, 2, "ieee"), (80, bf16, 0, "ieee"), (80, f32, 1, "tf32")):
            compile_for(ff_forward_kernel, arch, xp_ptr=dt, xn_ptr=dt, w_ptr=dt, b_ptr=dt if norm else None,
                        hp_ptr=dt, hn_ptr=dt, ss_part_ptr=f32, den_ptr=f32, colsum_part_ptr=f32 if peer else None,
                        B=70, N=90, K=100, norm_eps=1e-8, NORM=norm, HAS_BIAS=bool(norm), PEER=peer,
                        INPUT_PRECISION=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
        for arch, dt in ((90, bf16), (80, f32)):
            p = f32 if peer else None
            compile_for(ff_loss_kernel, arch, ss_part_ptr=f32, gp_ptr=dt, gn_ptr=dt, coef_ptr=f32, loss_ptr=dt,
                        colsum_part_ptr=p, r_ptr=p, r_new_ptr=p, v_ptr=p, B=70, N=90, num_tiles=2, threshold=1.0,
                        symba_alpha=4.0, num_m_tiles=2, **peer_scalars(70, 90, 0.5 if peer else 0.0, 0.9),
                        GOODNESS=1, LOSS=1, PEER=peer, BLOCK=128, BLOCK_UNITS=128)
        cfgs = [FFConfig(optimizer="adam", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
                FFConfig(optimizer="sgd", lr=1e-3, momentum=0.9)]
        for arch, dt, up in ((90, f32, NO_UPDATE), (90, bf16, optim_args(3, cfgs[0])),
                             (80, f32, optim_args(3, cfgs[1]))):
            grads = dt if up is NO_UPDATE else None
            p = f32 if peer else None
            compile_for(ff_weight_grad_kernel, arch, xp_ptr=dt, xn_ptr=dt, hp_ptr=dt, hn_ptr=dt, coef_ptr=f32,
                        den_ptr=f32, loss_ptr=dt, v_ptr=p, r_new_ptr=p, r_ptr=p, w_ptr=dt, b_ptr=dt, gw_ptr=grads,
                        gb_ptr=grads, s1w_ptr=f32, s2w_ptr=f32, s1b_ptr=f32, s2b_ptr=f32, B=70, N=90, K=100,
                        **up.scalars, NORM=2, HAS_BIAS=True, OPTIM=up.optim, MOMENTUM=up.momentum_buffer, PEER=peer,
                        INPUT_PRECISION="ieee", BLOCK_N=64, BLOCK_K=32, BLOCK_B=32)

    cfg = FFConfig(threshold=19.0, peer_norm=0.5)
    graphs = []
    def keep(gm, inputs):
        graphs.append(gm.code)
        return gm
    def step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, r):
        return torch.ops.ffkernels_triton.ff_step(x_pos, x_neg, w, b, s1w, s2w, s1b, s2b, r, 3, cfg.op_options)
    with FakeTensorMode():
        shapes = [(7, 33), (7, 33), (19, 33), (19,), (19, 33), (19, 33), (19,), (19,), (19,)]
        aot_function(step, fw_compiler=keep)(*[torch.empty(s, device="cuda") for s in shapes])
    code = graphs[0]
    assert code.count("triton_kernel_wrapper_functional(") == 3, code
    assert code.count("'PEER': True") == 3, code  # kernels 1-3 compiled with the peer code
    assert "triton_kernel_wrapper_functional_proxy_2['r_ptr']" in code, code  # r is an output of kernel 3
    print("ok")
""")


@pytest.mark.skipif(INTERPRET or not HAVE_TRITON,
                    reason="needs triton, and the kernels as real JIT functions: run without TRITON_INTERPRET")
def test_triton_peer_variants_compile_for_sm80_sm90_and_trace():
    """Without a GPU: kernels 1-3 with and without PEER compile to sm_80/sm_90 code (bundled ptxas), and ff_step
    with a peer_mean is a triton_op whose functionalized graph launches the three kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(ffkernels.__file__)),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-4000:]


# ---- on a GPU: triton and cuda against the oracle -------------------------------------------------------------

GPU_BACKENDS = ["triton", "cuda"]


def _usable(backend):
    reason = BACKENDS[backend].unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {backend!r} is not available: {reason}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES + [((300, 9, 20), COMBOS[0], (1.0, 0.5), True),
                                          ((3, 5, 1100), COMBOS[1], (1.0, 0.5), True)],
                         ids=[case_id(c) for c in CASES] + ["300x9x20", "3x5x1100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.gpu
@gpu_only
def test_gpu_step_with_peer_norm_matches_oracle(backend, case, dtype):
    _usable(backend)
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton has no float64")
    (B, K, N), (norm, goodness, loss, opt), (lam, mu), bias = case
    cfg = make_config(goodness, N, norm=norm, loss=loss, peer_norm=lam, peer_momentum=mu, **OPTIMIZERS[opt])
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        trajectory(backend, B, K, N, bias, cfg, steps=3, seed=11, device="cuda", dtype=dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("poison", ["nan-input", "inf-in-r"])
@pytest.mark.gpu
@gpu_only
def test_gpu_nonfinite_loss_leaves_r_weights_and_state(backend, poison):
    _usable(backend)
    _nonfinite_case(backend, "cuda", poison, "adam")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.gpu
@gpu_only
def test_gpu_lambda_zero_and_step_equals_grad_then_update(backend):
    _usable(backend)
    _lambda_zero_case(backend, "cuda")
    _step_equals_grad_then_update(backend, "cuda")
