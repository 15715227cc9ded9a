"""fp32 vs bf16 training curves of one study task, from two study folders (issue 18's check: the paper preset's
lr 1e-4 curve under bf16 autocast within the seed spread of fp32).

    python scripts/precision_curves.py docs/study-paper docs/study-paper-bf16 --pretext rotation --algo ff \
        --out docs/study-paper-bf16/precision

writes OUT.md (per evaluation epoch: the pretext accuracy of every seed of each precision, bf16 − fp32 for the same
seed (same initial weights and batches), fp32's seed spread, and whether bf16's mean lies inside fp32's seeds' range;
then the last epoch's per-layer loss and the best transfer by each probe) and OUT.png
(pretext accuracy and the summed per-layer loss per epoch, one line per run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def runs(folder: str, dataset: str, pretext: str, algo: str) -> list:
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if (r["dataset"], r["pretext"], r["algo"]) == (dataset, pretext, algo)]
    if not rows:
        raise SystemExit(f"precision_curves: {folder} has no {dataset}/{pretext}/{algo} run")
    return sorted(rows, key=lambda r: r["seed"])


def _pct(values) -> str:
    return " / ".join(f"{100 * v:.1f}" for v in values)


def table(fp32: list, bf16: list) -> str:
    epochs = fp32[0]["curves"]["eval_epoch"]
    if any(r["curves"]["eval_epoch"] != epochs for r in fp32 + bf16):
        raise SystemExit("precision_curves: the runs were evaluated at different epochs")
    seeds = lambda rows: "/".join(str(r["seed"]) for r in rows)  # noqa: E731
    lines = [f"| epoch | fp32 pretext acc % (seeds {seeds(fp32)}) | bf16 pretext acc % (seeds {seeds(bf16)}) | "
             "bf16 − fp32, same seed (points) | fp32 seed spread, max − min (points) | bf16 mean inside fp32's range |",
             "|---|---|---|---|---|---|"]
    inside, paired, spread = 0, [], []
    fp32_by_seed = {r["seed"]: r for r in fp32}
    for i, epoch in enumerate(epochs):
        a = [r["curves"]["pretext_accuracy"][i] for r in fp32]
        b = [r["curves"]["pretext_accuracy"][i] for r in bf16]
        d = [100 * (r["curves"]["pretext_accuracy"][i] - fp32_by_seed[r["seed"]]["curves"]["pretext_accuracy"][i])
             for r in bf16 if r["seed"] in fp32_by_seed]
        ok = min(a) <= statistics.mean(b) <= max(a)
        inside += ok
        paired += d
        spread.append(100 * (max(a) - min(a)))
        lines.append(f"| {epoch} | {_pct(a)} | {_pct(b)} | {' / '.join(f'{x:+.1f}' for x in d) or '–'} | "
                     f"{spread[-1]:.1f} | {'yes' if ok else 'no'} |")
    largest = f"{max(map(abs, paired)):.1f}" if paired else "–"
    lines += ["", f"bf16's mean inside fp32's seed range at {inside} of {len(epochs)} evaluation epochs; the largest "
              f"same-seed difference {largest} points, fp32's seed spread up to {max(spread):.1f} points (median "
              f"{statistics.median(spread):.1f}).", "",
              "| run | seed | loss per layer, last epoch | best transfer, lbfgs % (layer) | best transfer, paper % | "
              "train s | threads |", "|---|---|---|---|---|---|---|"]
    for name, rows in (("fp32", fp32), ("bf16", bf16)):
        for r in rows:
            best = {p: max(v["layers"] + [v["all"]]) for p, v in r["probes"].items()}
            lines.append(f"| {name} | {r['seed']} | {' '.join(f'{x:.2f}' for x in r['curves']['loss'][-1])} | "
                         f"{100 * r['best_transfer']:.1f} ({r['best_transfer_layer']}) | "
                         f"{100 * best.get('paper', float('nan')):.1f} | {r['train_seconds']:.0f} | {r['threads']} |")
    return "\n".join(lines) + "\n"


def plot(fp32: list, bf16: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows, style in (("fp32", fp32, "-"), ("bf16", bf16, "--")):
        for r in rows:
            c = r["curves"]
            acc.plot(c["eval_epoch"], [100 * v for v in c["pretext_accuracy"]], style, marker="o",
                     label=f"{name} seed {r['seed']}")
            loss.plot(c["epoch"], [sum(v) for v in c["loss"]], style, label=f"{name} seed {r['seed']}")
    acc.set(xlabel="epoch", ylabel="pretext accuracy %", title=title)
    loss.set(xlabel="epoch", ylabel="summed per-layer FF loss", yscale="log", title="training loss")
    acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("fp32", help="study folder of the fp32 runs")
    p.add_argument("bf16", help="study folder of the bf16 runs (--precision bf16)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--pretext", default="rotation")
    p.add_argument("--algo", default="ff")
    p.add_argument("--out", required=True, help="path prefix of OUT.md and OUT.png")
    a = p.parse_args(argv)
    fp32, bf16 = (runs(f, a.dataset, a.pretext, a.algo) for f in (a.fp32, a.bf16))
    if any(r["config"].get("precision", "fp32") != "fp32" for r in fp32) or \
            any(r["config"].get("precision") != "bf16" for r in bf16):
        raise SystemExit("precision_curves: the first folder must hold fp32 runs and the second bf16 runs")
    head = (f"# {a.dataset} {a.pretext} {a.algo}: fp32 vs bf16 autocast\n\nGenerated by `python "
            f"scripts/precision_curves.py {a.fp32} {a.bf16} --dataset {a.dataset} --pretext {a.pretext} --algo "
            f"{a.algo} --out {a.out}`.\n\n")
    with open(a.out + ".md", "w") as f:
        f.write(head + table(fp32, bf16) + f"\n![curves]({os.path.basename(a.out)}.png)\n")
    plot(fp32, bf16, a.out + ".png", f"{a.dataset} {a.pretext} {a.algo}")
    print(f"wrote {a.out}.md and {a.out}.png")


if __name__ == "__main__":
    main()
