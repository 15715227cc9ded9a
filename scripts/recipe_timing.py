"""Time the recipe parts of issue 10 against plain FF, back to back on the same data (interleaved repeats).

    PYTHONPATH=. python scripts/recipe_timing.py [--threads 2] [--repeats 3] [--json out.json]

Epoch time (mnist5k train split, 784-1000-1000-1000, batch 100, one epoch per measurement, the median over
repeats, the variants interleaved so machine noise hits them alike) of: plain FF; + head; + head + hard
negatives; + head + hard negatives + jitter 1; plain + hard negatives by goodness (no head). Then the parts of
the head's cost on one batch (the neutral forward, the head's step), and prediction on the 1,000 test inputs:
head (one pass), goodness with the shared first layer, and goodness by embedding every label (the old way).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ffkernels import FFNet, embed_label
from ffkernels.data import load_dataset
from ffkernels.training import train_ff_epoch

VARIANTS = {
    "plain": dict(head=False, negatives="random", jitter=0),
    "+head": dict(head=True, negatives="random", jitter=0),
    "+head+hard": dict(head=True, negatives="hard", jitter=0),
    "+head+hard+jitter": dict(head=True, negatives="hard", jitter=1),
    "plain+hard(goodness)": dict(head=False, negatives="hard", jitter=0),
}


def build(dims, head, seed=0):
    torch.manual_seed(seed)
    return FFNet(dims, head=head, num_classes=10 if head else None)


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def old_predict(net, x, num_classes):
    """FFNet.predict before the first layer was shared: every label embedded, the whole net per label."""
    labels = torch.arange(num_classes).repeat_interleave(x.shape[0])
    xs = embed_label(x.repeat(num_classes, 1), labels, num_classes)
    return net.goodness(xs)[:, net.predict_layers].sum(-1).view(num_classes, -1).argmax(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000, 1000])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset("mnist5k")
    dims = [ds.in_features, *a.hidden]
    nets = {name: build(dims, v["head"]) for name, v in VARIANTS.items()}
    gens = {name: torch.Generator().manual_seed(0) for name in VARIANTS}
    times = {name: [] for name in VARIANTS}
    for r in range(a.repeats + 1):  # round 0 warms up
        for name, v in VARIANTS.items():
            st = train_ff_epoch(nets[name], ds.x_train, ds.y_train, 10, 100, gens[name], negatives=v["negatives"],
                                jitter=v["jitter"], image_shape=ds.image_shape)
            if r:
                times[name].append(st.seconds)
    res = {"threads": torch.get_num_threads(), "dims": dims, "epoch_seconds": {}}
    base = statistics.median(times["plain"])
    print(f"epoch time, median of {a.repeats} interleaved ({torch.get_num_threads()} threads):")
    for name, ts in times.items():
        m = statistics.median(ts)
        res["epoch_seconds"][name] = {"median": m, "all": ts, "vs_plain": m / base}
        print(f"  {name:22s} {m:6.3f} s  x{m / base:.2f}   ({' '.join(f'{t:.3f}' for t in ts)})")

    net = nets["+head"]
    x, y = ds.x_train[:100], ds.y_train[:100]
    with torch.no_grad():
        feats = net.head_features(x)
        logits = net.head(feats)
    parts = {
        "one FF step (head net, random negatives)": lambda: net.ff_step_labeled(x, y, (y + 1) % 10, 10),
        "neutral forward of all layers (B=100)": lambda: net.head_features(x),
        "head logits + step (B=100)": lambda: net.head.step(feats, y, net.head(feats)),
        "hard_negatives from logits": lambda: __import__("ffkernels").hard_negatives(logits, y),
        "goodness_scores of the batch (no-head hard)": lambda: net.goodness_scores(x, 10),
    }
    res["per_batch_ms"] = {}
    print("per batch of 100 (median of 20):")
    for name, fn in parts.items():
        ms = timed(fn, 20) * 1e3
        res["per_batch_ms"][name] = ms
        print(f"  {name:45s} {ms:7.2f} ms")

    xt = ds.x_test
    pred = {"head": lambda: net.predict(xt, 10, method="head"),
            "goodness (shared first layer)": lambda: net.predict(xt, 10, method="goodness"),
            "goodness (every label embedded, old)": lambda: old_predict(net, xt, 10)}
    res["predict_seconds_1000"] = {}
    print("predict 1,000 test inputs (median of 5):")
    for name, fn in pred.items():
        s = timed(fn, 5)
        res["predict_seconds_1000"][name] = s
        print(f"  {name:40s} {s * 1e3:8.1f} ms")
    h, g = res["predict_seconds_1000"]["head"], res["predict_seconds_1000"]["goodness (shared first layer)"]
    print(f"  head is {g / h:.1f}x faster than goodness; sharing the first layer: "
          f"{res['predict_seconds_1000']['goodness (every label embedded, old)'] / g:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
