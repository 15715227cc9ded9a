"""Markdown tables from ``ffkernels train --json`` files: one row per group of runs (the file name up to
``_seed<N>``), mean ± std over its seeds, so that the README and docs numbers come from kept files.

    python scripts/train_table.py docs/fashion-mnist/*.json > docs/fashion-mnist/results.md

Columns: the group, FF or BP, the split the accuracy was measured on (test, or validation with --validation),
epochs, accuracy at the last epoch per seed and their mean ± std, the whole run's wall time (training and
evaluation), seconds per training epoch and training samples/s (mean over the epochs), the threads (each seed's
where they differ), and the options that set the run apart (lr, jitter, head layers, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys


def _group(path: str) -> str:
    return re.sub(r"_seed\d+$", "", os.path.splitext(os.path.basename(path))[0])


def _mean_std(values, fmt="{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _options(run: dict) -> str:
    recipe = run.get("recipe") or {}
    if run.get("model") == "cnn":
        parts = [f"cnn channels {'-'.join(map(str, run['channels']))}, pool after "
                 f"{' '.join(map(str, run['pool_after']))}"]
        if run.get("conv_block"):  # runs from before the BatchNorm block have none (plain, rms)
            parts.append(f"{run['conv_block']} block, norm {run.get('norm')}")
    else:
        parts = [f"hidden {'-'.join(map(str, run['hidden']))}"]
    if run.get("loss") == "competitive" and run.get("algo") != "bp":
        parts.append(f"competitive, temperature {run.get('temperature')}")
    if run.get("algo") == "bp":
        parts.append(f"bp lr {run.get('bp_lr')}")
    else:
        parts.append(f"lr {run.get('lr', '?')}")
        if run.get("loss") == "competitive":
            pass  # no head, negatives or peer norm: they do not apply
        elif recipe.get("head_layers") is not None:
            parts.append(f"head layers {' '.join(map(str, recipe['head_layers']))}")
        if run.get("loss") != "competitive":
            parts.append(f"negatives {recipe.get('negatives')}")
            parts.append(f"peer norm {recipe.get('peer_norm')}")
    parts += [f"jitter {recipe.get('jitter')}", f"{recipe.get('lr_schedule')} schedule"]
    if run.get("precision", "fp32") != "fp32":
        parts.append(run["precision"])
    return ", ".join(parts)


def _threads(runs) -> str:
    """The runs' thread count, or each seed's where they differ."""
    counts = [r.get("threads") for r in runs]
    return str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))


def table(paths) -> str:
    groups = {}
    for path in sorted(paths):
        with open(path) as f:
            groups.setdefault(_group(path), []).append(json.load(f))
    lines = ["| runs | algo | split | epochs | accuracy % per seed | mean ± std | wall s | s/epoch | samples/s | "
             "threads | options |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for name, runs in groups.items():
        accs = [100 * r["test_accuracy"] for r in runs]
        epochs = [e for r in runs for e in r["epochs"]]
        lines.append(
            f"| {name} | {runs[0].get('algo', 'ff')} | {runs[0].get('eval_split', 'test')} | {len(runs[0]['epochs'])} | "
            f"{' / '.join(f'{a:.2f}' for a in accs)} | {_mean_std(accs)} | "
            f"{_mean_std([r['wall_seconds'] for r in runs], '{:.0f}')} | "
            f"{statistics.mean(e['seconds'] for e in epochs):.1f} | "
            f"{statistics.mean(e['samples_per_s'] for e in epochs):.0f} | {_threads(runs)} | "
            f"{_options(runs[0])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="ffkernels train --json files")
    args = p.parse_args(argv)
    print(table(args.files))


if __name__ == "__main__":
    main(sys.argv[1:])
