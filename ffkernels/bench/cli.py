"""``ffkernels bench``: FF layer-step throughput against the GEMM floor, the reference and BP, and whole-network
FF-vs-BP training throughput and peak memory as depth grows. Prints tables; ``--json`` and ``--plot`` save them.

    ffkernels bench                                  # CPU (or the GPU when there is one), fp32
    ffkernels bench --device cuda --dtype bfloat16,float32 --json gpu.json --plot gpu.png
    ffkernels bench --quick                          # tiny shapes, few repeats (a smoke run)
    ffkernels bench --json cpu.json --markdown cpu.md --plot cpu.png
    ffkernels bench --conv --threads 1               # the conv cases: FFConv2d steps and the competitive conv net

A case that fails (CUDA out of memory, a Triton compile error, a missing kernel) is recorded with its error
and the rest goes on; the exit status is then 1. With ``--json`` (and ``--markdown``) the file is rewritten
after every shape and every network depth, so a run that is killed leaves what it measured; on Ctrl-C / SIGINT
the run stops, writes what it has and exits with 130. The issue-12 targets are evaluated in every report.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from .._types import BackendUnavailableError
from ..backends import BACKEND_NAMES
from ..cli_options import HelpFormatter, add_precision_option, show_progress
from ..cnn import CNN_DEFAULTS
from . import report
from .cases import DEFAULT_SHAPES, GPU_SHAPES, QUICK_SHAPES, fused_backends, parse_shapes
from .conv_cases import CONV_QUICK_SHAPES, CONV_SHAPES, conv_backends, parse_conv_shapes
from .conv_layer import bench_conv_layers
from .conv_network import ConvNetConfig, bench_conv_network
from .layer import bench_layers
from .machine import machine_info
from .memory import methods as memory_methods
from .network import DTYPES, MEMORY_STEPS, bench_network, summarize

SCHEMA = "ffkernels-bench/1"

# option -> (default, --quick default); None in args means "not given"
DEFAULTS = {
    "shapes": (DEFAULT_SHAPES, QUICK_SHAPES),
    "depths": ("2,4,8", "1,2"),
    "width": (2000, 24),
    "batch": (256, 16),
    "in_features": (784, 40),
    "repeats": (10, 2),
    "warmup": (3, 1),
    "min_time": (0.05, 0.0),
}
# with --conv (the conv cases, on any device): the CNN recipe's layers and net (batch 64, 1x28x28 images)
CONV_DEFAULTS = {
    "shapes": (CONV_SHAPES, CONV_QUICK_SHAPES),
    "depths": ("1,2,3,4", "1,2"),
    "channels": ("40,80,160,320", "10,20"),
    "image": ("1x28x28", "1x8x8"),
    "batch": (64, 4),
    **{k: DEFAULTS[k] for k in ("repeats", "warmup", "min_time")},
}
LINEAR_ONLY, CONV_ONLY = ("width", "in_features"), ("channels", "image")
# the defaults that differ with --device cuda (not --quick): the large shapes, and a network batch where the
# activations BP stores are not lost next to the weights (B = 4096, the batch of issue 12's target shape)
CUDA_DEFAULTS = {"shapes": GPU_SHAPES, "batch": 4096}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype_list(text: str) -> list:
    names = [DTYPE_ALIASES.get(v.strip().lower(), v.strip().lower()) for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected comma-separated dtypes, some of {', '.join(DTYPES)} (or "
                                         f"{', '.join(DTYPE_ALIASES)}), got {text!r}")
    return list(dict.fromkeys(names))


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _image_shape(text: str) -> list:
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected an image shape CxHxW (e.g. 1x28x28), got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--dtype", type=_dtype_list, default="float32",
                   help=f"parameter and input dtype, or several comma-separated (each measured in turn, layer steps "
                        f"then networks), some of {', '.join(DTYPES)}")
    p.add_argument("--tf32", action="store_true",
                   help="fp32 matmuls on TF32 tensor cores (CUDA): torch.backends.cuda.matmul.allow_tf32 (cuBLAS: "
                        "the floor, reference, BP and the cuda backend's GEMMs) and the Triton backend's fp32 dot "
                        "precision 'tf32'")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated fused backends to measure, some of "
                        f"{', '.join(b for b in BACKEND_NAMES if b != 'reference')} (default: every built one that "
                        "runs on the device and dtype; the reference step is always measured)")
    p.add_argument("--conv", action="store_true",
                   help="measure the convolution cases instead of the linear ones: the FFConv2d layer steps (fused, "
                        "its floor, the reference, BP-dx) on conv --shapes, and the competitive conv net (FFNet of "
                        "FFConv2d with pooling) vs BPCNN as depth grows (--depths, --channels, --image, --batch)")
    p.add_argument("--shapes", default=None,
                   help=f"layer shapes BxKxN (B real samples = rows of x_pos = rows of x_neg, K -> N), "
                        f"comma-separated (default: {DEFAULTS['shapes'][0]}; with --device cuda "
                        f"{CUDA_DEFAULTS['shapes']}). With --conv, conv shapes LOSS:BxCxHxW:N[kK][pP] (loss "
                        f"competitive: B images; hinton: B pos + B neg; C -> N channels, kernel K (3), padding P (1)); "
                        f"default {CONV_SHAPES}")
    p.add_argument("--depths", type=_int_list, default=None,
                   help=f"network depths for FF vs BP (default: {DEFAULTS['depths'][0]}; with --conv "
                        f"{CONV_DEFAULTS['depths'][0]}: the first d conv layers of --channels)")
    p.add_argument("--channels", type=_int_list, default=None,
                   help=f"--conv: out_channels of the conv net's layers, with the CNN recipe's 2x2 max-pooling (after "
                        f"layers {' '.join(map(str, CNN_DEFAULTS['pool_after']))}; default: "
                        f"{CONV_DEFAULTS['channels'][0]})")
    p.add_argument("--image", type=_image_shape, default=None,
                   help=f"--conv: the conv net's input images CxHxW (default: {CONV_DEFAULTS['image'][0]})")
    p.add_argument("--width", type=_positive_int, default=None,
                   help=f"network layer width (default: {DEFAULTS['width'][0]})")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help=f"network batch: real samples per step (default: {DEFAULTS['batch'][0]}; with --device cuda "
                        f"{CUDA_DEFAULTS['batch']}; with --conv {CONV_DEFAULTS['batch'][0]} images)")
    p.add_argument("--in-features", type=_positive_int, default=None,
                   help=f"network input size (default: {DEFAULTS['in_features'][0]}, MNIST)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"timed repeats per case (default: {DEFAULTS['repeats'][0]})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed calls before timing (default: {DEFAULTS['warmup'][0]})")
    p.add_argument("--min-time", type=float, default=None,
                   help=f"seconds one repeat lasts at least: short steps are called several times per repeat "
                        f"(default: {DEFAULTS['min_time'][0]})")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and networks, few repeats: a smoke run, not a measurement")
    p.add_argument("--no-layer", action="store_true", help="skip the layer-step benchmark")
    p.add_argument("--no-network", action="store_true", help="skip the whole-network FF-vs-BP benchmark")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write every result and the machine record here (rewritten after every shape and depth)")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of throughput and memory vs depth")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as Markdown (for docs)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: print (and --markdown/--plot) the results saved in FILE by --json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_precision_option(p, "bf16: also measure the float32 layer steps under torch.autocast(dtype=bfloat16) "
                            "(fused-<backend>-bf16, labeled-<backend>-bf16, on backends with bf16 GEMMs), side by "
                            "side with the fp32 ones, and floor-bf16 (bf16 GEMMs + the optimizer pass); with --conv "
                            "fused-<backend>-bf16 and the conv floor-bf16 (bf16 convolutions + the optimizer pass)")


def _settings(args) -> dict:
    """The effective options: given ones, else the --quick, the --device cuda or the normal defaults (with --conv:
    CONV_DEFAULTS, on every device)."""
    conv = bool(getattr(args, "conv", False))
    given = [k for k in (LINEAR_ONLY if conv else CONV_ONLY) if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} "
                         + ("describe" if len(given) > 1 else "describes")
                         + (" the MLP of the linear cases; the conv net takes --channels and --image" if conv
                            else " the conv net: add --conv"))
    table = CONV_DEFAULTS if conv else DEFAULTS
    s = {k: getattr(args, k, None) for k in table}
    for k, (normal, quick) in table.items():
        if s[k] is None:
            s[k] = (quick if args.quick else normal if conv
                    else CUDA_DEFAULTS.get(k, normal) if args.device == "cuda" else normal)
    if isinstance(s["depths"], str):
        s["depths"] = _int_list(s["depths"])
    if conv:
        s["channels"] = _int_list(s["channels"]) if isinstance(s["channels"], str) else s["channels"]
        s["image"] = _image_shape(s["image"]) if isinstance(s["image"], str) else s["image"]
    if s["warmup"] < 0:
        raise ValueError(f"--warmup must be >= 0, got {s['warmup']}")
    if not s["min_time"] >= 0:
        raise ValueError(f"--min-time must be >= 0, got {s['min_time']}")
    dtypes = _dtypes(args)
    s.update(conv=conv, device=args.device, dtype=",".join(dtypes), dtypes=dtypes, quick=args.quick,
             threads=torch.get_num_threads(), tf32=bool(getattr(args, "tf32", False)),
             precision=getattr(args, "precision", "fp32"))
    s["command"] = reproduce_command(s, args)
    return s


def _dtypes(args) -> list:
    return _dtype_list(args.dtype) if isinstance(args.dtype, str) else list(args.dtype)


def reproduce_command(s: dict, args) -> str:
    """A command line that repeats this run with every option spelled out."""
    parts = ["ffkernels", "bench", "--device", s["device"], "--dtype", s["dtype"], "--threads", str(s["threads"])]
    if s.get("tf32"):
        parts.append("--tf32")
    if s.get("precision", "fp32") != "fp32":
        parts += ["--precision", s["precision"]]
    if s.get("conv"):
        parts.append("--conv")
    if args.backends:
        parts += ["--backends", args.backends]
    if not args.no_layer:
        parts += ["--shapes", s["shapes"]]
    if not args.no_network and s.get("conv"):
        parts += ["--depths", ",".join(map(str, s["depths"])), "--channels", ",".join(map(str, s["channels"])),
                  "--image", "x".join(map(str, s["image"])), "--batch", str(s["batch"])]
    elif not args.no_network:
        parts += ["--depths", ",".join(map(str, s["depths"])), "--width", str(s["width"]), "--batch",
                  str(s["batch"]), "--in-features", str(s["in_features"])]
    parts += ["--repeats", str(s["repeats"]), "--warmup", str(s["warmup"]), "--min-time", str(s["min_time"])]
    parts += ["--no-layer"] * args.no_layer + ["--no-network"] * args.no_network
    return shlex.join(parts)


def _set_tf32(on: bool) -> dict:
    """Turn TF32 fp32 matmuls on or off (cuBLAS and the Triton backend); returns the previous settings."""
    from ..backends.triton import get_fp32_precision, set_fp32_precision

    before = {"cublas": torch.backends.cuda.matmul.allow_tf32, "triton": get_fp32_precision()}
    torch.backends.cuda.matmul.allow_tf32 = on
    set_fp32_precision("tf32" if on else "ieee")
    return before


def _restore_tf32(before: dict) -> None:
    from ..backends.triton import set_fp32_precision

    torch.backends.cuda.matmul.allow_tf32 = before["cublas"]
    set_fp32_precision(before["triton"])


def _save(args, result: dict, t0: "float | None" = None) -> None:
    """Rewrite --json and --markdown with what is measured so far (atomically)."""
    if t0 is not None:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        report.write_json(args.json, result)
    if args.markdown:
        report.write_markdown(args.markdown, result)


def _run(args) -> dict:
    if args.no_layer and args.no_network:
        raise ValueError("--no-layer and --no-network leave nothing to measure")
    if args.plot and args.no_network:
        raise ValueError("--plot draws the network part (throughput and memory vs depth); drop --no-network")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is available (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    s = _settings(args)
    device = torch.device(args.device)
    timing = {"warmup": s["warmup"], "repeats": s["repeats"], "min_time": s["min_time"]}
    conv = s["conv"]
    plans = {}
    if not args.no_layer:  # a requested backend that cannot run in one of the dtypes fails before measuring
        requested = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
        choose = conv_backends if conv else fused_backends
        plans = {name: choose(device, DTYPES[name], requested) for name in s["dtypes"]}
        shapes = parse_conv_shapes(s["shapes"]) if conv else parse_shapes(s["shapes"])
    if conv and not args.no_network:  # a depth, channel list or image the net cannot have fails before measuring
        for d in s["depths"]:
            ConvNetConfig("ff", d, s["batch"], channels=s["channels"], image=s["image"])
    layer = None if args.no_layer else {"backends": [], "skipped": [], "rows": [], "by_dtype": {}}
    network = None if args.no_network else {"memory_method": memory_methods(device, MEMORY_STEPS), "rows": [],
                                            "summary": summarize([])}
    # the linear cases in "layer" and "network", the conv cases (--conv) in "conv_layer" and "conv_network"
    result = {"schema": SCHEMA, "machine": machine_info(device), "settings": s, "complete": False,
              "layer": None if conv else layer, "network": None if conv else network,
              "conv_layer": layer if conv else None, "conv_network": network if conv else None}
    before = _set_tf32(True) if s["tf32"] else None
    save = lambda: _save(args, result, t0)  # noqa: E731
    try:
        save()
        for name in s["dtypes"]:  # dtype by dtype: its layer steps, then its networks
            if not args.no_layer:
                _run_layers(result, name, plans[name], shapes, device, timing, save, show_progress(args),
                            bf16=s["precision"] == "bf16" and name == "float32", conv=conv)
            if not args.no_network:
                _run_networks(args, result, name, s, device, timing, save)
        result["complete"] = True
    except KeyboardInterrupt:
        result["interrupted"] = "interrupted (Ctrl-C / SIGINT) before the end"
    finally:
        if before is not None:
            _restore_tf32(before)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _run_layers(result, name, plan, shapes, device, timing, save, progress, bf16: bool = False,
                conv: bool = False) -> None:
    layer = result["conv_layer" if conv else "layer"]
    backends, skipped = plan
    layer["by_dtype"][name] = {"backends": backends, "skipped": skipped}
    layer["backends"] += [b for b in backends if b not in layer["backends"]]
    layer["skipped"] += [pair for pair in skipped if pair not in layer["skipped"]]
    base = list(layer["rows"])

    def on_shape(rows):
        layer["rows"] = base + rows
        save()
    bench = bench_conv_layers if conv else bench_layers
    bench(shapes, device, DTYPES[name], backends, progress=progress, on_shape=on_shape, bf16=bf16, **timing)


def _run_networks(args, result, name, s, device, timing, save) -> None:
    net = result["conv_network" if s["conv"] else "network"]
    base = list(net["rows"])

    def on_depth(rows):
        net["rows"] = base + rows
        net["summary"] = summarize(net["rows"])
        save()
    common = dict(batch=s["batch"], device=device, dtype=name, threads=args.threads, progress=show_progress(args),
                  on_depth=on_depth, **timing)
    if s["conv"]:
        bench_conv_network(s["depths"], channels=s["channels"], image=s["image"], **common)
    else:
        bench_network(s["depths"], width=s["width"], in_features=s["in_features"], **common)


def failures(result: dict) -> list:
    """"what failed" lines: every layer case and network configuration with an error."""
    out = [f"layer {r['shape']} {r.get('dtype', '')} {r['case']}: {r['error']}"
           for r in (result.get("layer") or {}).get("rows", []) if r.get("error")]
    out += [f"network depth {r['depth']} {r.get('dtype', '')} {r['algo']}: {r['error']}"
            for r in (result.get("network") or {}).get("rows", []) if r.get("error")]
    out += [f"conv layer {r['shape']} {r.get('dtype', '')} {r['case']}: {r['error']}"
            for r in (result.get("conv_layer") or {}).get("rows", []) if r.get("error")]
    out += [f"conv network depth {r['depth']} {r.get('dtype', '')} {r['algo']}: {r['error']}"
            for r in (result.get("conv_network") or {}).get("rows", []) if r.get("error")]
    return out


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a result of `ffkernels bench --json` (schema {SCHEMA!r})")
    return result


def _report(args, result: dict) -> None:
    print(report.text_report(result), flush=True)
    if args.json:
        report.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.markdown:
        report.write_markdown(args.markdown, result)
        print(f"wrote {args.markdown}")
    if args.plot:  # last: a plot that fails (no matplotlib) loses none of the tables
        report.write_plot(args.plot, result)
        print(f"wrote {args.plot}")


def run(args) -> dict:
    try:
        result = _load(args.from_json) if args.from_json else _run(args)
        _report(args, result)
    except (ValueError, BackendUnavailableError) as e:
        msg = str(e)
        raise SystemExit(msg if msg.startswith("ffkernels") else f"ffkernels bench: {msg}") from e
    if args.from_json:
        return result
    if result.get("interrupted"):
        print(f"ffkernels bench: {result['interrupted']}; the report holds what was measured", file=sys.stderr)
        raise SystemExit(130)
    failed = failures(result)
    if failed:
        print(f"ffkernels bench: {len(failed)} case(s) failed (recorded in the report):\n  " + "\n  ".join(failed),
              file=sys.stderr)
        raise SystemExit(1)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ffkernels bench", description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
