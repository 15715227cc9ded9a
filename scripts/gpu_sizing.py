"""The GPU sizing table, on paper: what the fused FF step should cost on an H200 next to its GEMM floor, for the
shapes and dtypes of ``ffkernels bench --device cuda``, before any GPU has run it. Writes docs/gpu-sizing.md:

    python scripts/gpu_sizing.py                 # rewrites docs/gpu-sizing.md
    python scripts/gpu_sizing.py --stdout        # prints it instead

Model: time = the two GEMMs every FF step needs, at an achievable tensor-core rate (the floor), plus the bytes
every other pass of the step moves at an achievable HBM bandwidth, plus launch gaps and the latency of the
single-block kernels. The passes are counted from the kernel structure in docs/cuda.md and docs/triton.md.
Every number that is assumed rather than derived is marked [A1]... in the output.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

# ---- assumptions (each printed in the document with its source) -----------------------------------------------

# [A1] datasheet peaks, H200 SXM, dense (NVIDIA's "with sparsity" figures halved); NVL boards are ~15% lower
PEAK_TFLOPS = {"bf16": 989.0, "tf32": 494.7, "fp32": 66.9}
PEAK_TBPS = 4.8
# [A2] achievable: ~80% of the peak for large cuBLAS GEMMs (790 TFLOP/s bf16 is issue 12's figure), ~90% of HBM
ACHIEVABLE_TFLOPS = {"bf16": 790.0, "tf32": 395.0, "fp32": 53.5}
ACHIEVABLE_TBPS = 4.3
LAUNCH_GAP_US = 2.0        # [A4] idle time between two back-to-back kernels queued without a host sync
SERIAL_ITER_US = 0.3       # [A5] one dependent iteration of a single-block kernel: about one L2 round trip
HOST_STEP_US = 60.0        # [A6] host time to issue one fused step (Python, dispatcher, launches); not measured
HOST_MM_US = 6.0           # [A6] host time to issue one torch.mm from Python
L2_MB = 50.0               # H100/H200 L2 size, for the [A3] caveat

SHAPES = [(256, 784, 2000), (256, 2000, 2000), (4096, 2000, 2000), (4096, 4096, 4096)]  # bench's GPU defaults
TARGET = (4096, 2000, 2000)
MODES = [  # (label, element bytes of x/W/h, GEMM rate key, Triton kernel-1 BN (docs/triton.md tile sizes))
    ("bf16", 2, "bf16", 128),
    ("fp32, TF32 on", 4, "tf32", 64),
    ("fp32, TF32 off (torch default)", 4, "fp32", 64),
]
STATE_BYTES = 4  # Adam's exp_avg and exp_avg_sq are fp32 whatever the parameter dtype (docs/cuda.md)


@dataclass
class Pass:
    what: str
    bytes: float = 0.0
    serial_iters: int = 0


def cuda_passes(B, K, N, e) -> list:
    """docs/cuda.md, "What runs on the GPU": the passes other than the two GEMMs (rows R = 2B)."""
    R = 2 * B
    return [
        Pass("1 normalize: read x, write x̂ (the row is read twice; the second time from cache) [A3]", 2 * R * K * e),
        Pass("3 epilogue: read z, write h_pos/h_neg, overwrite z with ∂L/∂z (h read back from cache) [A3]",
             3 * R * N * e),
        Pass("4 sum_pairs: one block sums B doubles", B * 8, serial_iters=math.ceil(B / 256)),
        Pass("3/5 grad_b: the epilogue writes per-block fp32 column partials of ∂L/∂z, bias_grad_kernel adds them",
             2 * epilogue_blocks(B) * N * 4),
        Pass("7 Adam on W: read W, dW, m, v; write W, m, v (state fp32)", N * K * (3 * e + 4 * STATE_BYTES)),
    ]


CUDA_LAUNCHES = 8  # normalize, GEMM, epilogue, sum_pairs, bias_grad, GEMM, Adam W, Adam b


def epilogue_blocks(B) -> int:
    """csrc/cuda/ff_rows.cuh: one pair per block up to B = 512, then about 512 blocks of at most 64 pairs."""
    pairs = min(64, max(1, math.ceil(B / 512)))
    return math.ceil(B / pairs)


def triton_passes(B, K, N, e, bn) -> list:
    """docs/triton.md, "Kernels": what the three kernels move beyond the floor's two GEMMs."""
    R = 2 * B
    tiles = math.ceil(N / bn)
    block = min(2 ** math.ceil(math.log2(B)), 1024)
    return [
        Pass(f"1 forward: its GEMM reads x and W and writes h like the floor's z = x̂Wᵀ; extra: the partial "
             f"goodness ({tiles} N-tiles × 2B fp32) and d", tiles * R * 4 + R * 4),
        Pass(f"2 loss: one program reads the partials back, writes g, c; ⌈B/{block}⌉ × {tiles} dependent "
             "iterations", tiles * R * 4 + R * 4 + 2 * B * e, serial_iters=math.ceil(B / block) * tiles),
        Pass("3 dW GEMM + Adam epilogue: operands as the floor's dW GEMM (h, c, x, d); dW never written "
             "(−N·K·e against the floor); Adam reads W, m, v and writes them",
             N * K * (2 * e + 4 * STATE_BYTES) - N * K * e),
    ]


TRITON_LAUNCHES = 3


def gemm_flops(B, K, N) -> float:
    """The two GEMMs no FF step avoids, over the 2B rows: z = x̂Wᵀ and dW = Gᵀx̂, 2·(2B)·K·N FLOPs each."""
    return 2 * (2 * (2 * B) * K * N)


def estimate(B, K, N, mode) -> dict:
    label, e, rate, bn = mode
    flops = gemm_flops(B, K, N)
    floor_us = flops / (ACHIEVABLE_TFLOPS[rate] * 1e12) * 1e6
    out = {"shape": f"{B}x{K}x{N}", "mode": label, "gflop": flops / 1e9, "floor_us": floor_us}
    for name, passes, launches in (("cuda", cuda_passes(B, K, N, e), CUDA_LAUNCHES),
                                   ("triton", triton_passes(B, K, N, e, bn), TRITON_LAUNCHES)):
        nbytes = sum(p.bytes for p in passes)
        serial = sum(p.serial_iters for p in passes) * SERIAL_ITER_US
        extra_us = nbytes / (ACHIEVABLE_TBPS * 1e12) * 1e6 + (launches - 2) * LAUNCH_GAP_US + serial
        out[name] = {"mb": nbytes / 1e6, "bytes_us": nbytes / (ACHIEVABLE_TBPS * 1e12) * 1e6, "serial_us": serial,
                     "extra_us": extra_us, "ratio": (floor_us + extra_us) / floor_us, "passes": passes}
    # [A6]: the device finishes a step faster than the host can issue the next one
    out["host_bound"] = floor_us + out["cuda"]["extra_us"] < HOST_STEP_US or floor_us < 2 * HOST_MM_US
    return out


def _f(v, spec):
    return format(v, spec)


def document() -> str:
    rows = [estimate(B, K, N, m) for m in MODES for (B, K, N) in SHAPES]
    L = []
    L += ["# GPU sizing on paper: the fused FF step against its GEMM floor on an H200", "",
          "Generated by `python scripts/gpu_sizing.py` (edit the script, not this file). These are **predictions**, "
          "made before any GPU ran the kernels, to compare with the first measured run (`scripts/gpu_check.sh` → "
          "`bench.json`, [docs/performance.md](performance.md)). Every assumed number is marked **[A…]** and listed "
          "at the end; change the constants at the top of the script and regenerate.", "",
          "## The model", "",
          "For a shape BxKxN (B real samples: 2B = B pos + B neg rows, layer K → N), parameter dtype of e bytes:", "",
          "- **floor** = the two GEMMs every FF step needs (`floor` case of the bench: `z = x̂Wᵀ` and `dW = Gᵀx̂`), "
          "2·(2B)·K·N FLOPs each, at the achievable GEMM rate [A2]; their operand reads and output writes are part "
          "of the floor.",
          "- **extra** = the bytes every other pass of the fused step moves, at the achievable HBM bandwidth [A2], "
          f"+ {LAUNCH_GAP_US:g} µs per kernel launch beyond two [A4] + {SERIAL_ITER_US:g} µs per dependent iteration "
          "of a single-block kernel [A5].",
          "- **ratio** = (floor + extra) / floor: the number the bench reports as `x floor` for `fused-cuda` and "
          "`fused-triton`; issue 12's target is ≤ 1.3 at 4096x2000x2000 in bf16.", "",
          "### Bytes per pass (beyond the two GEMMs), rows R = 2B, Adam state fp32", "",
          "CUDA backend (docs/cuda.md, 8 launches):", "",
          "| pass | bytes |", "|---|---|",
          "| 1 `normalize_kernel`: read x, write x̂ | 2·R·K·e |",
          "| 2 GEMM z = x̂Wᵀ | (floor) |",
          "| 3 `epilogue_kernel`: read z, write h_pos‖h_neg, overwrite z with ∂L/∂z; per-block fp32 column partials of "
          "∂L/∂z (P blocks: B up to 512, then about 512) | 3·R·N·e + P·N·4 |",
          "| 4 `sum_pairs_kernel` (one block, ⌈B/256⌉ dependent iterations) | 8·B |",
          "| 5 `bias_grad_kernel`: the partials added in block order | P·N·4 |",
          "| 6 GEMM dW = (∂L/∂z)ᵀx̂ | (floor) |",
          "| 7 `adam_kernel` on W: read W, dW, m, v; write W, m, v | N·K·(3e + 16) |", "",
          "Triton backend (docs/triton.md, 3 launches; BN = 128 for bf16, 64 for fp32):", "",
          "| pass | bytes |", "|---|---|",
          "| 1 forward GEMM (reads x, not x̂: the row scale is folded into the epilogue; writes h, not z) | (floor) "
          "+ partial goodness ⌈N/BN⌉·R·4 + d R·4 |",
          "| 2 loss kernel (one program, ⌈B/min(2^⌈log2 B⌉, 1024)⌉·⌈N/BN⌉ dependent iterations) | ⌈N/BN⌉·R·4 + "
          "R·4 + 2·B·e |",
          "| 3 dW GEMM with the Adam epilogue (dW never written: −N·K·e against the floor) | N·K·(2e + 16) − N·K·e |",
          "", "## The table", ""]
    for mode in MODES:
        label = mode[0]
        L += [f"**{label}** — GEMMs at {ACHIEVABLE_TFLOPS[mode[2]]:g} TFLOP/s [A2], HBM at {ACHIEVABLE_TBPS:g} TB/s",
              "",
              "| B x K x N | GEMM GFLOP | floor µs | CUDA extra MB | CUDA extra µs | CUDA ratio | Triton extra MB | "
              "Triton extra µs | Triton ratio | note |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r["mode"] == label):
            c, t = r["cuda"], r["triton"]
            note = []
            if r["host_bound"]:
                note.append("host-bound [A6]: the ratio measures Python/launch overhead")
            if tuple(int(v) for v in r["shape"].split("x")) == TARGET and label == "bf16":
                note.append("**issue 12 target: ≤ 1.3**")
            L.append(f"| {r['shape']} | {r['gflop']:.1f} | {r['floor_us']:.1f} | {c['mb']:.1f} | {c['extra_us']:.1f} | "
                     f"{c['ratio']:.2f} | {t['mb']:.1f} | {t['extra_us']:.1f} | {t['ratio']:.2f} | "
                     f"{'; '.join(note)} |")
        L.append("")
    tgt = next(r for r in rows if r["mode"] == "bf16" and r["shape"] == "4096x2000x2000")
    c, t = tgt["cuda"], tgt["triton"]
    L += ["## What it says", "",
          f"- **At the target (4096x2000x2000, bf16)** the floor is {tgt['floor_us']:.0f} µs. The CUDA backend moves "
          f"{c['mb']:.0f} MB besides its GEMMs ({c['bytes_us']:.0f} µs at {ACHIEVABLE_TBPS:g} TB/s) plus "
          f"{c['extra_us'] - c['bytes_us']:.0f} µs of launches and the single-block loss sum: **{c['ratio']:.2f}× the "
          "floor, over the 1.3 target** unless L2 keeps part of the 33 MB intermediates (x̂, z) between kernels [A3], "
          "or the floor runs below 790 TFLOP/s while the extra passes do not slow down. The extra is the normalize "
          "pass "
          "(x read and x̂ written), the epilogue's three passes over z/h, the bias partials and the Adam pass; the first "
          "three are what fusing the row scale and the epilogue into the GEMMs (as the Triton kernels do) removes.",
          f"- The Triton backend moves only {t['mb']:.0f} MB besides its GEMMs and has 3 launches: "
          f"**{t['ratio']:.2f}×** if its GEMMs ran at cuBLAS speed [A7]; its single-program loss kernel costs "
          f"~{t['serial_us']:.0f} µs at this batch [A5]. Its tiles are fixed and untuned, so its GEMMs will likely be "
          "slower: with GEMMs at a fraction f of cuBLAS the ratio is (floor/f + extra)/floor, e.g. "
          f"{(tgt['floor_us'] / 0.8 + t['extra_us']) / tgt['floor_us']:.2f} at f = 0.8.",
          "- **At B = 256** the GEMMs take a few µs and the step is dominated by the Adam pass over W "
          f"(N·K·(3e+16) bytes: {cuda_passes(256, 784, 2000, 2)[-1].bytes / 1e6:.0f} MB for 784→2000 in bf16) and by "
          "launch gaps: ratios of 3–7× in bf16 are expected there even from perfect kernels, and the measured times "
          "will mostly be host overhead [A6]. These shapes say little about the kernels.",
          "- **fp32 without TF32** (torch's default `allow_tf32 = False`): GEMMs at ~54 TFLOP/s dominate everything; "
          "ratios near 1.0–1.1 for both backends at B = 4096 (Triton's fp32 `tl.dot` with `input_precision=\"ieee\"` "
          "is not a tensor-core GEMM and may be much slower than cuBLAS SGEMM [A7]). **fp32 with TF32** sits between.",
          "- The bench's `fused-*` cases call the step without the host-side finiteness check of `FFLinear.ff_step` "
          "(`bool(torch.isfinite(loss))`, a device synchronization every step). Training through `FFLinear.ff_step` / "
          f"`FFNet.ff_step` adds the host's per-step time (~{HOST_STEP_US:g} µs [A6]) to every layer step, since the "
          "GPU then idles while Python issues the next one: at the target that alone is "
          f"~{HOST_STEP_US / tgt['floor_us']:.2f}× "
          "the floor on top of the ratio above.", "",
          "## Compare with the first run", "",
          "From `bench.json` (or the tables of `bench.md`), per shape and dtype:", "",
          "- the `floor` row: its median time against the floor column here; achieved rate = GEMM GFLOP / time "
          "(the bench prints it under each table). Far below 790 TFLOP/s (bf16) means [A2] is optimistic, and every "
          "ratio here is too high in proportion.",
          "- `fused-cuda` / `fused-triton` `ratio_to_floor` against the ratio columns; the difference between the "
          "measured extra (fused − floor) and the extra µs here tells whether the passes are bandwidth-bound as "
          "assumed (measured ≈ predicted), latency/launch-bound (measured ≫ predicted at small B) or helped by L2 "
          "(measured < predicted).",
          "- the network part: FF's time per step over the sum of its layers' fused steps shows the per-layer "
          "synchronization cost [A6].", "",
          "## Assumptions", "",
          f"- **[A1] peaks** — NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200), SXM, dense (the sheet's "
          f"\"with sparsity\" figures halved): BF16 tensor core {PEAK_TFLOPS['bf16']:g} TFLOP/s, TF32 tensor core "
          f"{PEAK_TFLOPS['tf32']:g}, FP32 (no tensor cores) {PEAK_TFLOPS['fp32']:g}; HBM3e {PEAK_TBPS:g} TB/s. The "
          "H200 NVL (PCIe card, 600 W) is ~15% lower in compute (835 / 418 / 60) with the same bandwidth; the "
          "machine's variant is in `env.txt` (nvidia-smi name and power limit) after the first run.",
          "- **[A2] achievable rates** — large cuBLAS GEMMs at ~80% of the peak: "
          f"{ACHIEVABLE_TFLOPS['bf16']:g} TFLOP/s "
          f"bf16 (issue 12's figure), {ACHIEVABLE_TFLOPS['tf32']:g} TF32, {ACHIEVABLE_TFLOPS['fp32']:g} FP32 "
          f"(SGEMM, torch's default for fp32); streaming kernels at ~90% of HBM: {ACHIEVABLE_TBPS:g} TB/s. "
          "Small GEMMs (B = 256) get much less than 80%.",
          f"- **[A3] no reuse between kernels** — every pass reads and writes HBM. The L2 ({L2_MB:g} MB) can keep part "
          "of an intermediate written just before (x̂ and z are 33 MB at the target in bf16), so the measured extra "
          "may be lower; a row re-read inside one kernel (normalize, epilogue) is counted once.",
          f"- **[A4] launch gaps** — {LAUNCH_GAP_US:g} µs between back-to-back kernels queued without a host "
          "synchronization (typically 1–4 µs); two of each step's launches are charged to the floor's two GEMMs.",
          f"- **[A5] single-block kernels** — {SERIAL_ITER_US:g} µs per dependent loop iteration (about one L2 round "
          "trip; 0.15–0.6 µs plausible): CUDA's `sum_pairs_kernel`, Triton's loss kernel (the partial goodness of "
          "kernel 1 is still in L2).",
          f"- **[A6] host overhead** — issuing a fused step from Python (FFLinear/functional layer, dispatcher, "
          f"launches) assumed ~{HOST_STEP_US:g} µs on the GPU host, a torch.mm ~{HOST_MM_US:g} µs; not measured on "
          "it (on the 2 busy cores of the development machine one `FFLinear.ff_step` of the cpu backend on a 16→16 "
          "layer takes ~290 µs, a `torch.mm` ~5 µs). A row is marked host-bound when the predicted GPU time of the "
          f"step is under {HOST_STEP_US:g} µs or the floor under two torch.mm calls.",
          "- **[A7] Triton GEMMs at cuBLAS speed** — an upper bound: its tiles are fixed (64×128×64 bf16 forward, "
          "64×64 W tiles reducing 64 rows per step for dW) and untuned; fp32 `tl.dot` with `input_precision=\"ieee\"` "
          "runs without tensor cores.",
          "- Adam with fp32 state (the default optimizer), bias terms (N elements) ignored, RMS normalization "
          "(the default: the normalize pass runs).", ""]
    return "\n".join(L)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                 "gpu-sizing.md"))
    p.add_argument("--stdout", action="store_true", help="print the document instead of writing it")
    args = p.parse_args(argv)
    text = document()
    if args.stdout:
        print(text)
        return
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
