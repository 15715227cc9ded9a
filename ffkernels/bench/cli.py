"""``ffkernels bench``: FF layer-step throughput against the GEMM floor, the reference and BP, and whole-network
FF-vs-BP training throughput and peak memory as depth grows. Prints tables; ``--json`` and ``--plot`` save them.

    ffkernels bench                                  # CPU (or the GPU when there is one), fp32
    ffkernels bench --device cuda --dtype bfloat16 --json gpu.json --plot gpu.png
    ffkernels bench --quick                          # tiny shapes, few repeats (a smoke run)
    ffkernels bench --json cpu.json --markdown cpu.md --plot cpu.png
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from .._types import BackendUnavailableError
from ..backends import BACKEND_NAMES
from ..cli_options import HelpFormatter
from . import report
from .cases import DEFAULT_SHAPES, QUICK_SHAPES, fused_backends, parse_shapes
from .layer import bench_layers
from .machine import machine_info
from .network import DTYPES, bench_network

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


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and input dtype")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated fused backends to measure, some of "
                        f"{', '.join(b for b in BACKEND_NAMES if b != 'reference')} (default: every built one that "
                        "runs on the device and dtype; the reference step is always measured)")
    p.add_argument("--shapes", default=None,
                   help=f"layer shapes BxKxN (B real samples = rows of x_pos = rows of x_neg, K -> N), "
                        f"comma-separated (default: {DEFAULTS['shapes'][0]})")
    p.add_argument("--depths", type=_int_list, default=None,
                   help=f"network depths for FF vs BP (default: {DEFAULTS['depths'][0]})")
    p.add_argument("--width", type=_positive_int, default=None,
                   help=f"network layer width (default: {DEFAULTS['width'][0]})")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help=f"network batch: real samples per step (default: {DEFAULTS['batch'][0]})")
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
    p.add_argument("--json", default=None, metavar="FILE", help="write every result and the machine record here")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG of throughput and memory vs depth")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the tables as Markdown (for docs)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: print (and --markdown/--plot) the results saved in FILE by --json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args) -> dict:
    """The effective options: given ones, else the --quick or the normal defaults."""
    s = {k: getattr(args, k) for k in DEFAULTS}
    for k, (normal, quick) in DEFAULTS.items():
        if s[k] is None:
            s[k] = quick if args.quick else normal
    if isinstance(s["depths"], str):
        s["depths"] = _int_list(s["depths"])
    if s["warmup"] < 0:
        raise ValueError(f"--warmup must be >= 0, got {s['warmup']}")
    if not s["min_time"] >= 0:
        raise ValueError(f"--min-time must be >= 0, got {s['min_time']}")
    s.update(device=args.device, dtype=args.dtype, quick=args.quick, threads=torch.get_num_threads())
    s["command"] = reproduce_command(s, args)
    return s


def reproduce_command(s: dict, args) -> str:
    """A command line that repeats this run with every option spelled out."""
    parts = ["ffkernels", "bench", "--device", s["device"], "--dtype", s["dtype"], "--threads", str(s["threads"])]
    if args.backends:
        parts += ["--backends", args.backends]
    if not args.no_layer:
        parts += ["--shapes", s["shapes"]]
    if not args.no_network:
        parts += ["--depths", ",".join(map(str, s["depths"])), "--width", str(s["width"]), "--batch",
                  str(s["batch"]), "--in-features", str(s["in_features"])]
    parts += ["--repeats", str(s["repeats"]), "--warmup", str(s["warmup"]), "--min-time", str(s["min_time"])]
    parts += ["--no-layer"] * args.no_layer + ["--no-network"] * args.no_network
    return shlex.join(parts)


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
    s = _settings(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    timing = {"warmup": s["warmup"], "repeats": s["repeats"], "min_time": s["min_time"]}
    result = {"schema": SCHEMA, "machine": machine_info(device), "settings": s,
              "layer": None, "network": None}
    if not args.no_layer:
        requested = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
        backends, skipped = fused_backends(device, dtype, requested)
        rows = bench_layers(parse_shapes(s["shapes"]), device, dtype, backends, progress=not args.no_progress,
                            **timing)
        result["layer"] = {"backends": backends, "skipped": skipped, "rows": rows}
    if not args.no_network:
        result["network"] = bench_network(s["depths"], width=s["width"], batch=s["batch"],
                                          in_features=s["in_features"], device=device, dtype=args.dtype,
                                          threads=args.threads, progress=not args.no_progress, **timing)
    return result


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
    if args.plot:
        report.write_plot(args.plot, result)
        print(f"wrote {args.plot}")
    if args.markdown:
        report.write_markdown(args.markdown, result)
        print(f"wrote {args.markdown}")


def run(args) -> dict:
    try:
        result = _load(args.from_json) if args.from_json else _run(args)
        _report(args, result)
    except (ValueError, BackendUnavailableError) as e:
        msg = str(e)
        raise SystemExit(msg if msg.startswith("ffkernels") else f"ffkernels bench: {msg}") from e
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ffkernels bench", description=__doc__,
                                formatter_class=HelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
