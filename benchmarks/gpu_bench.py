"""GPU benchmark of the fused FF layer step, run by scripts/gpu_check.sh (or on its own):

    python benchmarks/gpu_bench.py --out gpu_results

Per shape (B positive + B negative rows, K -> N) and dtype, milliseconds per step, timed with CUDA
events after warm-up (median of several timed blocks):
  * fused step     each GPU backend that is available here ("cuda", "triton"): forward, goodness, loss,
                   local gradient and the Adam update in one call (ffkernels.functional.ff_step)
  * reference FF   FFLayerRef.step: autograd + torch.optim.Adam
  * BP step        the same layer as nn.Linear + ReLU over the same 2B rows, loss = sum of squares of its
                   output, backward, torch.optim.Adam(fused=True)
  * cuBLAS floor   the two GEMMs an FF step cannot avoid: z = xhat W^T over 2B rows and dW = G^T xhat
with each step's ratio to the floor and speed-up over the reference FF. Then the peak GPU memory of
whole-network training, FF (FFNet.ff_step) vs BP (BPMLP + Adam), on the same 2B rows, depths 2, 4, 8.
Writes gpu_bench.json (with the machine: GPU, torch/triton/CUDA versions) and gpu_bench.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import ffkernels
from ffkernels import functional
from ffkernels import bp
from ffkernels.backends import compiled
from ffkernels.backends import reference as ref
from ffkernels.backends import BACKENDS
from ffkernels.config import FFConfig

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a dependency of ffkernels; this keeps the script usable without it
    def tqdm(it, **_):
        return it

SHAPES = [(256, 784, 2000), (256, 2000, 2000), (4096, 2000, 2000), (4096, 4096, 4096)]  # (B, K, N)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FUSED_BACKENDS = ("cuda", "triton")
TARGET_SHAPE = (4096, 2000, 2000)
TARGET_FLOOR_RATIO = 1.3   # fused step <= 1.3x the cuBLAS floor
TARGET_SPEEDUP = 3.0       # fused step >= 3x faster than the reference FF
MEMORY_DEPTHS = (2, 4, 8)
COLUMNS = ["fused_cuda", "fused_triton", "reference_ff", "bp_step", "floor"]


# ---- timing --------------------------------------------------------------------------------------------

def time_ms(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median over `repeats` blocks of the mean milliseconds per call of `fn`, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / iters)
    return statistics.median(per_call)


def gpu_backend_reason(name: str, dtype: torch.dtype):
    """None when backend `name` can run a fused step on CUDA tensors of `dtype`, else why not."""
    b = BACKENDS[name]
    reason = b.unavailable_reason() or b.device_reason(torch.device("cuda"))
    if reason is None and b.dtypes is not None and dtype not in b.dtypes:
        reason = f"backend {name!r} does not support {dtype}"
    return reason


# ---- the step variants -----------------------------------------------------------------------------------

def make_problem(B: int, K: int, N: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x_pos = torch.randn(B, K, device="cuda", dtype=dtype, generator=g)
    x_neg = torch.randn(B, K, device="cuda", dtype=dtype, generator=g)
    layer = nn.Linear(K, N, device="cuda", dtype=dtype)  # nn.Linear's init, shared by every variant
    cfg = FFConfig(threshold=FFConfig.default_threshold("sum", N))
    return x_pos, x_neg, layer, cfg


def fused_step_fn(backend: str, x_pos, x_neg, linear: nn.Linear, cfg: FFConfig):
    w, b = linear.weight.detach().clone(), linear.bias.detach().clone()
    st_w = tuple(torch.zeros_like(w, dtype=torch.float32) for _ in cfg.state_names)
    st_b = tuple(torch.zeros_like(b, dtype=torch.float32) for _ in cfg.state_names)
    step = [0]

    def run():
        step[0] += 1
        functional.ff_step(x_pos, x_neg, w, b, st_w, st_b, step[0], cfg, backend=backend)

    return run


def reference_step_fn(x_pos, x_neg, linear: nn.Linear, cfg: FFConfig):
    layer = ref.FFLayerRef(linear.weight, linear.bias, cfg)
    return lambda: layer.step(x_pos, x_neg)


def bp_step_fn(x_pos, x_neg, linear: nn.Linear):
    model = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, device="cuda",
                                    dtype=linear.weight.dtype), nn.ReLU())
    model[0].load_state_dict(linear.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    x = torch.cat([x_pos, x_neg])

    def run():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        opt.step()

    return run


def floor_fn(B: int, K: int, N: int, dtype: torch.dtype):
    xhat = torch.randn(2 * B, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype)
    grad_z = torch.randn(2 * B, N, device="cuda", dtype=dtype)

    def run():
        torch.mm(xhat, w.t())
        torch.mm(grad_z.t(), xhat)

    return run


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def bench_layer_step(B, K, N, dtype_name, args) -> dict:
    """One table row. A variant that fails (out of memory, a Triton compile error...) is recorded under
    "errors" and the others still run."""
    dtype = DTYPES[dtype_name]
    x_pos, x_neg, linear, cfg = make_problem(B, K, N, dtype)
    timing = dict(warmup=args.warmup, iters=args.iters, repeats=args.repeats)
    row = {"B": B, "K": K, "N": N, "dtype": dtype_name, "ms": {}, "skipped": {}, "errors": {}}
    variants = {}
    for name in FUSED_BACKENDS:
        reason = gpu_backend_reason(name, dtype)
        if reason:
            row["skipped"][f"fused_{name}"] = reason
        else:
            variants[f"fused_{name}"] = lambda name=name: fused_step_fn(name, x_pos, x_neg, linear, cfg)
    variants["reference_ff"] = lambda: reference_step_fn(x_pos, x_neg, linear, cfg)
    variants["bp_step"] = lambda: bp_step_fn(x_pos, x_neg, linear)
    variants["floor"] = lambda: floor_fn(B, K, N, dtype)
    for key, make in variants.items():
        try:
            row["ms"][key] = time_ms(make(), **timing)
        except Exception as e:  # noqa: BLE001  (recorded in the output, and the exit status says so)
            row["errors"][key] = _error(e)
        torch.cuda.empty_cache()
    floor, reference = row["ms"].get("floor"), row["ms"].get("reference_ff")
    steps = {k: v for k, v in row["ms"].items() if k != "floor"}
    row["samples_per_s"] = {k: 2 * B / (v / 1e3) for k, v in steps.items()}
    row["ratio_to_floor"] = {k: v / floor for k, v in steps.items()} if floor else {}
    row["speedup_over_reference"] = ({k: reference / v for k, v in steps.items() if k.startswith("fused_")}
                                     if reference else {})
    return row


# ---- whole-network memory --------------------------------------------------------------------------------

def peak_memory_mb(train_step, steps: int = 3) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        train_step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def bench_memory(depth, dtype_name, args) -> dict:
    dtype = DTYPES[dtype_name]
    B, K, width = args.mem_batch, args.mem_in, args.mem_width
    dims = [K] + [width] * depth
    x_pos = torch.randn(B, K, device="cuda", dtype=dtype)
    x_neg = torch.randn(B, K, device="cuda", dtype=dtype)
    row = {"depth": depth, "dtype": dtype_name, "rows": 2 * B, "dims": dims, "errors": {}}
    try:
        net = ffkernels.FFNet(dims, device="cuda", dtype=dtype)
        row["ff_backend"] = net.backend
        row["ff_peak_mb"] = peak_memory_mb(lambda: net.ff_step(x_pos, x_neg))
        del net
    except Exception as e:  # noqa: BLE001
        row["errors"]["ff"] = _error(e)
    torch.cuda.empty_cache()
    try:
        model = bp.BPMLP(dims, num_classes=10, device="cuda", dtype=dtype)
        opt = bp.make_bp_optimizer(model, lr=3e-3)
        x = torch.cat([x_pos, x_neg])
        y = torch.randint(0, 10, (2 * B,), device="cuda")
        row["bp_peak_mb"] = peak_memory_mb(lambda: bp.bp_step(model, opt, x, y))
        del model, opt
    except Exception as e:  # noqa: BLE001
        row["errors"]["bp"] = _error(e)
    torch.cuda.empty_cache()
    return row


# ---- report ----------------------------------------------------------------------------------------------

def machine_info() -> dict:
    triton = None
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton
        triton = _triton.__version__
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton,
        "ffkernels_cuda_archs": compiled.cuda_archs(),
        "available_backends": ffkernels.available_backends(),
        "fp32_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "python": platform.python_version(),
    }


def targets(rows) -> list:
    out = []
    for r in rows:
        if ((r["B"], r["K"], r["N"]) != TARGET_SHAPE or "fused_cuda" not in r["ratio_to_floor"]
                or "fused_cuda" not in r["speedup_over_reference"]):
            continue
        ratio, speedup = r["ratio_to_floor"]["fused_cuda"], r["speedup_over_reference"]["fused_cuda"]
        out.append({"dtype": r["dtype"], "ratio_to_floor": ratio, "ratio_target": TARGET_FLOOR_RATIO,
                    "ratio_met": ratio <= TARGET_FLOOR_RATIO, "speedup_over_reference": speedup,
                    "speedup_target": TARGET_SPEEDUP, "speedup_met": speedup >= TARGET_SPEEDUP})
    return out


def _step_cell(r: dict, c: str) -> str:
    if c in r["ms"]:
        cell = f"{r['ms'][c]:.3f}"
        extras = []
        if c != "floor" and c in r["ratio_to_floor"]:
            extras.append(f"{r['ratio_to_floor'][c]:.2f}x floor")
        if c in r["speedup_over_reference"]:
            extras.append(f"{r['speedup_over_reference'][c]:.1f}x ref")
        return cell + (f" ({', '.join(extras)})" if extras else "")
    if c in r["errors"]:
        return "error"
    return "—"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# ffkernels GPU benchmark", "",
             f"{m['gpu']} (sm {m['compute_capability']}), torch {m['torch']} (CUDA {m['torch_cuda']}), "
             f"triton {m['triton'] or 'absent'}, fp32 matmul TF32: {m['fp32_matmul_tf32']}", "",
             "## Layer step: ms per step (× the cuBLAS floor, speed-up over the reference FF)", "",
             "| B+B, K→N | dtype | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in result["layer_step"]:
        lines.append(f"| {r['B']}+{r['B']}, {r['K']}→{r['N']} | {r['dtype']} | "
                     + " | ".join(_step_cell(r, c) for c in COLUMNS) + " |")
    notes = {f"{k}: skipped ({v})" for r in result["layer_step"] for k, v in r["skipped"].items()}
    notes |= {f"{k} at {r['B']}+{r['B']}, {r['K']}→{r['N']} {r['dtype']}: {v}"
              for r in result["layer_step"] for k, v in r["errors"].items()}
    lines += [""] + [f"- {n}" for n in sorted(notes)]
    lines += ["", f"## Targets at {TARGET_SHAPE[0]}+{TARGET_SHAPE[0]}, {TARGET_SHAPE[1]}→{TARGET_SHAPE[2]} "
              "(fused cuda step)", ""]
    if not result["targets"]:
        lines.append("not measured (no fused cuda step timing at this shape)")
    for t in result["targets"]:
        lines.append(f"- {t['dtype']}: {t['ratio_to_floor']:.2f}x the floor (target ≤ {t['ratio_target']}: "
                     f"{'met' if t['ratio_met'] else 'NOT met'}); {t['speedup_over_reference']:.1f}x faster than "
                     f"the reference (target ≥ {t['speedup_target']}: {'met' if t['speedup_met'] else 'NOT met'})")
    if result["memory"]:
        r0 = result["memory"][0]
        lines += ["", f"## Peak GPU memory of whole-network training (MB; {r0['rows']} rows, "
                  f"{r0['dims'][0]}→{r0['dims'][1]}, depth layers)", "",
                  "| depth | dtype | FF (FFNet.ff_step) | BP (BPMLP + Adam) | BP / FF |", "|---|---|---|---|---|"]
        for r in result["memory"]:
            ff = f"{r['ff_peak_mb']:.0f} ({r['ff_backend']})" if "ff_peak_mb" in r else r["errors"].get("ff", "—")
            bp = f"{r['bp_peak_mb']:.0f}" if "bp_peak_mb" in r else r["errors"].get("bp", "—")
            ratio = f"{r['bp_peak_mb'] / r['ff_peak_mb']:.2f}" if "ff_peak_mb" in r and "bp_peak_mb" in r else "—"
            lines.append(f"| {r['depth']} | {r['dtype']} | {ff} | {bp} | {ratio} |")
    return "\n".join(lines) + "\n"



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_results"), help="output folder")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks (the median is reported)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (default: torch's setting)")
    p.add_argument("--mem-batch", type=int, default=2048, help="B for the memory runs (B+B rows)")
    p.add_argument("--mem-in", type=int, default=784)
    p.add_argument("--mem-width", type=int, default=2000)
    p.add_argument("--no-memory", action="store_true", help="skip the whole-network memory runs")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; expected some of {list(DTYPES)}")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    result = {"machine": machine_info(), "settings": vars(args), "layer_step": [], "memory": []}
    cases = [(s, d) for s in SHAPES for d in dtypes]
    for (B, K, N), d in tqdm(cases, desc="layer step", unit="case"):
        result["layer_step"].append(bench_layer_step(B, K, N, d, args))
    result["targets"] = targets(result["layer_step"])
    if not args.no_memory:
        for depth, d in tqdm([(n, d) for n in MEMORY_DEPTHS for d in dtypes], desc="memory", unit="net"):
            result["memory"].append(bench_memory(depth, d, args))
    result["wall_s"] = time.time() - t0

    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"gpu_bench: wrote {args.out}/gpu_bench.json and {args.out}/gpu_bench.md in {result['wall_s']:.0f} s")
    failed = [r for r in result["layer_step"] + result["memory"] if r["errors"]]
    if failed:
        print(f"gpu_bench: {len(failed)} case(s) had errors (see the notes above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
