"""The fused cpu conv FF step against its floor and the reference (a measurement, not a test: no timed asserts).

    PYTHONPATH=. python benchmarks/conv_floor.py [--repeats 15] [--threads N] [--quick]

For each layer shape, median ms of:
    fused-hinton       BACKENDS["cpu"].conv_step, hinton loss, B positives + B negatives (one conv over 2B images)
    floor-hinton       what such a step cannot avoid: ATen's conv forward over the 2B images, ATen's weight-gradient
                       conv (convolution_backward, weight only) over them, and the optimizer update (the ff_update op)
    reference-hinton   the reference backend's conv_step (autograd + torch.optim)
and the same three for the competitive loss over 2B images without negatives (num_classes groups). Repeats are
interleaved (fused, floor, reference, fused, ...) so a busy neighbour slows all three alike; the ratios
fused / floor and reference / fused are what to read.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ffkernels import FFConfig
from ffkernels._types import ConvGeometry
from ffkernels.backends import BACKENDS

# (name, C_in, C_out, H = W, kernel, padding)
SHAPES = [
    ("1->32 28x28 k3 p1", 1, 32, 28, 3, 1),
    ("32->64 14x14 k3 p1", 32, 64, 14, 3, 1),
    ("64->128 7x7 k3 p1", 64, 128, 7, 3, 1),
    ("64->128 14x14 k3 p1", 64, 128, 14, 3, 1),
]
B = 128           # positives (and as many negatives) of the hinton step; the competitive step takes 2B images
NUM_CLASSES = 8   # competitive: class groups (divides 32, 64, 128)


def _state(cfg, *params):
    return [tuple(torch.zeros_like(p) for _ in cfg.state_names) for p in params]


def _setup(c_in, c_out, hw, k, pad, loss):
    gen = torch.Generator().manual_seed(0)
    competitive = loss == "competitive"
    cfg = FFConfig(loss=loss, goodness_over="group" if competitive else "sample", goodness="mean", threshold=0.5)
    geom = ConvGeometry((1, 1), (pad, pad), (1, 1), 1)
    w = torch.randn(c_out, c_in, k, k, generator=gen) * (c_in * k * k) ** -0.5
    b = torch.zeros(c_out)
    if competitive:
        xp, xn, t = torch.randn(2 * B, c_in, hw, hw, generator=gen), None, torch.randint(0, NUM_CLASSES, (2 * B,))
    else:
        xp = torch.randn(B, c_in, hw, hw, generator=gen) + 0.5
        xn, t = 1.5 * torch.randn(B, c_in, hw, hw, generator=gen), None
    return cfg, geom, w, b, xp, xn, t


def _runners(c_in, c_out, hw, k, pad, loss):
    cfg, geom, w, b, xp, xn, t = _setup(c_in, c_out, hw, k, pad, loss)
    nc = NUM_CLASSES if loss == "competitive" else 0
    cpu, ref = BACKENDS["cpu"], BACKENDS["reference"]
    params = {name: (w.clone(), b.clone()) for name in ("fused", "floor", "reference")}
    states = {name: _state(cfg, *p) for name, p in params.items()}
    steps = {name: 0 for name in params}
    x_all = xp if xn is None else torch.cat([xp, xn])
    linear_opts = cfg.replace(loss="hinton", goodness_over="sample").op_options  # the update reads the optimizer keys

    def fused():
        (wf, bf), (sw, sb) = params["fused"], states["fused"]
        steps["fused"] += 1
        cpu.conv_step(xp, xn, t, wf, bf, sw, sb, steps["fused"], geom, nc, cfg)

    def floor():
        (wf, bf), (sw, sb) = params["floor"], states["floor"]
        steps["floor"] += 1
        z = F.conv2d(x_all, wf, None, geom.stride, geom.padding, geom.dilation, geom.groups)
        gw = torch.ops.aten.convolution_backward(z, x_all, wf, None, list(geom.stride), list(geom.padding),
                                                 list(geom.dilation), False, [0, 0], geom.groups,
                                                 [False, True, False])[1]
        gb = z.sum((0, 2, 3))
        w2 = wf.view(wf.shape[0], -1)
        torch.ops.ffkernels.ff_update(w2, bf, gw.view_as(w2), gb, *(s.view_as(w2) for s in sw), *sb, None,
                                      steps["floor"], linear_opts)

    def reference():
        (wf, bf), (sw, sb) = params["reference"], states["reference"]
        steps["reference"] += 1
        ref.conv_step(xp, xn, t, wf, bf, sw, sb, steps["reference"], geom, nc, cfg)

    return {"fused": fused, "floor": floor, "reference": reference}


def measure(runners: dict, repeats: int, warmup: int = 2) -> dict:
    times = {name: [] for name in runners}
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, for a smoke run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {repeats} "
          f"(interleaved); hinton: {B}+{B} images, competitive: {2 * B} images, {NUM_CLASSES} groups")
    print(f"{'shape':22} {'loss':12} {'fused ms':>9} {'floor ms':>9} {'ref ms':>9} {'fused/floor':>12} "
          f"{'ref/fused':>10}")
    with torch.no_grad():
        for name, c_in, c_out, hw, k, pad in SHAPES:
            for loss in ("hinton", "competitive"):
                m = measure(_runners(c_in, c_out, hw, k, pad, loss), repeats)
                print(f"{name:22} {loss:12} {m['fused']:9.2f} {m['floor']:9.2f} {m['reference']:9.2f} "
                      f"{m['fused'] / m['floor']:12.2f} {m['reference'] / m['fused']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
