"""Ablation of issue 10's recipe: `ffkernels train` with every part on, then with each part switched off in turn.

    PYTHONPATH=. python scripts/recipe_ablation.py --epochs 60 --seeds 0 1 2 --out ablation
    PYTHONPATH=. python scripts/recipe_ablation.py --epochs 2 --seeds 0 --out /tmp/abl --dataset digits --hidden 64 64

Parts: the softmax head (--head; off: prediction and hard negatives by goodness), the cooldown schedule
(--lr-schedule cooldown; off: constant), peer normalization (--peer-norm; off: 0), hard negatives (--negatives
hard; off: random) and jitter (--jitter; off: 0). Rows: "full", one
"-<part>" row per part, and "none" (every part off: plain FF for the same epochs). Any option this script does not
know goes to every `ffkernels train` run (e.g. --dataset, --hidden, --optimizer sgd --lr 0.05 --momentum 0.9).

Each run is its own process (`python -m ffkernels train ... --json`); its accuracy and wall time come from that
JSON (`test_accuracy`, `wall_seconds`: training and evaluation, no start-up), the process time is recorded too.
Runs are sequential, in seed-major order so that every variant sees the same machine conditions in turn. The
folder holds one JSON per run (a rerun skips those already there), results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PARTS = {  # name: (flags when on, flags when off)
    "head": (["--head"], ["--no-head"]),
    "cooldown": (["--lr-schedule", "cooldown"], ["--lr-schedule", "constant"]),
    "peer-norm": (None, ["--peer-norm", "0"]),  # on: --peer-norm <value>, filled in below
    "hard-negatives": (["--negatives", "hard"], ["--negatives", "random"]),
    "jitter": (None, ["--jitter", "0"]),        # on: --jitter <pixels>
}


def variants(peer_norm: float, jitter: int) -> dict:
    """{row name: the recipe flags of that row}."""
    on = {k: v[0] for k, v in PARTS.items()}
    on["peer-norm"] = ["--peer-norm", repr(peer_norm)]
    on["jitter"] = ["--jitter", str(jitter)]
    rows = {"full": [f for k in PARTS for f in on[k]]}
    for part in PARTS:
        rows[f"-{part}"] = [f for k in PARTS for f in (PARTS[k][1] if k == part else on[k])]
    rows["none"] = [f for k in PARTS for f in PARTS[k][1]]
    return rows


def run_one(out: str, name: str, seed: int, flags: list, common: list, timeout: float) -> dict:
    path = os.path.join(out, f"{name}_seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    cmd = [sys.executable, "-m", "ffkernels", "train", *common, *flags, "--seed", str(seed), "--no-progress",
           "--json", path + ".train"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    process_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"recipe_ablation: {name} seed {seed} failed ({proc.returncode}):\n{' '.join(cmd)}\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(path + ".train") as f:
        train = json.load(f)
    os.remove(path + ".train")
    row = {"variant": name, "seed": seed, "flags": flags, "command": cmd, "test_accuracy": train["test_accuracy"],
           "wall_seconds": train["wall_seconds"], "process_seconds": process_seconds,
           "accuracy_per_epoch": [e["test_accuracy"] for e in train["epochs"]], "threads": train["threads"],
           "backend": train["backend"]}
    with open(path, "w") as f:
        json.dump(row, f, indent=2)
    return row


def mean_std(v):
    return (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)


def table(rows: list, names: list) -> str:
    by = {n: [r for r in rows if r["variant"] == n] for n in names}
    full_acc = statistics.fmean(r["test_accuracy"] for r in by["full"])
    lines = ["| variant | recipe flags | test acc % (mean ± std) | Δ vs full (pts) | wall s (mean ± std) | process s | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        rs = by[n]
        acc, acc_sd = mean_std([100 * r["test_accuracy"] for r in rs])
        wall, wall_sd = mean_std([r["wall_seconds"] for r in rs])
        proc = statistics.fmean(r["process_seconds"] for r in rs)
        lines.append(f"| {n} | `{' '.join(rs[0]['flags'])}` | {acc:.2f} ± {acc_sd:.2f} | {acc - 100 * full_acc:+.2f} | "
                     f"{wall:.1f} ± {wall_sd:.1f} | {proc:.1f} | {len(rs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=60, help="epochs of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each variant runs every seed)")
    p.add_argument("--out", default="recipe-ablation", help="folder for the per-run JSON and the tables")
    p.add_argument("--peer-norm", type=float, default=0.03, help="peer-normalization coefficient when on")
    p.add_argument("--jitter", type=int, default=1, help="jitter in pixels when on")
    p.add_argument("--only", nargs="+", default=None, help="run only these rows (e.g. full -head)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    args, common = p.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows_flags = variants(args.peer_norm, args.jitter)
    names = [n for n in rows_flags if args.only is None or n in args.only or n == "full"]
    common = [*common, "--epochs", str(args.epochs)]
    results = []
    for seed in args.seeds:
        for n in names:
            print(f"[{time.strftime('%H:%M:%S')}] {n} seed {seed}: ffkernels train {' '.join(common + rows_flags[n])}",
                  flush=True)
            r = run_one(args.out, n, seed, rows_flags[n], common, args.timeout)
            print(f"    test acc {100 * r['test_accuracy']:.2f}%  wall {r['wall_seconds']:.1f} s", flush=True)
            results.append(r)
    summary = {"epochs": args.epochs, "seeds": args.seeds, "train_args": common, "peer_norm": args.peer_norm, "jitter": args.jitter, "variants": rows_flags, "runs": results}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    md = (f"# Recipe ablation: {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}\n\n"
          f"Common `ffkernels train` options: `{' '.join(common)}`\n\n" + table(results, names))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
