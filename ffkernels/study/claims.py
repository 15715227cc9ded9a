"""The paper's claims as differences between runs: what docs/study.md's verdict rests on, with the paper's
reported difference beside ours (mean ± std over the seeds both sides have).

A claim compares run A with run B: two (pretext, algo) pairs of the study, or a run and the untrained network of
the same shape (the study's reference point, one per dataset). Differences are in points (percent).
"""
from __future__ import annotations

from .paper import PAPER_REPORTED_MNIST
from .tables import ALGO_NAMES, grouped, md, mean_std, reported_header

UNTRAINED = "untrained"
CLAIM_PRETEXTS = ("supervised", "rotation", "flip", "flip-hv", "jigsaw")


def claims() -> list:
    """[(claim, (pretext, algo), (pretext, algo) or UNTRAINED)] in the order the verdict reads them."""
    out = [("transfer gap", (p, "ff"), (p, "bp")) for p in CLAIM_PRETEXTS]
    out += [("pretraining helps", (p, a), UNTRAINED) for p in CLAIM_PRETEXTS for a in ("ff", "bp")]
    out += [("ablation", (p, "bp-goodness-all"), (p, "bp-goodness-last")) for p in CLAIM_PRETEXTS]
    out += [("ablation", (p, "bp-goodness-last"), (p, "bp")) for p in CLAIM_PRETEXTS]
    out += [("hybrid negatives", ("hybrid", "ff"), b) for b in (("supervised", "ff"), ("rotation", "ff"), UNTRAINED)]
    out += [("scff negatives", ("scff", "ff"), b)
            for b in (UNTRAINED, ("hybrid", "ff"), ("supervised", "ff"), ("rotation", "ff"), ("rotation", "bp"))]
    return out


def _name(side) -> str:
    return "untrained net" if side == UNTRAINED else f"{ALGO_NAMES[side[1]]} {side[0]}"


def _measures(probes) -> list:
    """(column header, value of a run or of the untrained reference) for every probe, last layer and best."""
    out = []
    for p in probes:
        out.append((f"{p} probe, last layer", lambda r, p=p: r["probes"][p]["layers"][-1]))
        out.append((f"{p} probe, best", lambda r, p=p: r["probes"][p]["best"]))
    return out


def _pairs(runs_a, runs_b) -> list:
    """[(a, b)] for every seed both sides have; runs_b may be one reference dict (no seed), paired with every a."""
    if not runs_a or not runs_b:
        return []
    if isinstance(runs_b, dict):
        return [(a, runs_b) for a in runs_a]
    b_by_seed = {r["seed"]: r for r in runs_b}
    return [(a, b_by_seed[a["seed"]]) for a in runs_a if a["seed"] in b_by_seed]


def _diff(pairs, value) -> str:
    return mean_std([value(a) - value(b) for a, b in pairs], signed=True)


def claims_table(rows, baseline, dataset: str) -> str:
    """Every claim either side can speak to: the paper's reported transfer difference (MNIST) and ours, by each
    probe (last layer and best), and the pretext-accuracy difference where both sides solve the same task."""
    g = grouped(rows)
    probes = [p for p in ("paper", "lbfgs", "scff") if any(p in r.get("probes", {}) for r in rows if r["dataset"] == dataset)]
    measures = _measures(probes)
    header = ["claim", "A − B", reported_header(dataset, "transfer"), "pretext acc"] + [m for m, _ in measures] + ["seeds"]
    body = []
    for claim, a, b in claims():
        runs_a = g.get((dataset, *a), [])
        runs_b = baseline.get("untrained") if b == UNTRAINED and baseline else g.get((dataset, *b), [])
        reported = [PAPER_REPORTED_MNIST.get(a), None if b == UNTRAINED else PAPER_REPORTED_MNIST.get(b)]
        paper = "–" if None in reported else f"{reported[0] - reported[1]:+.1f}"
        pairs = _pairs(runs_a, runs_b)
        if not pairs and paper == "–":
            continue
        same_task = b != UNTRAINED and a[0] == b[0]
        acc = _diff(pairs, lambda r: r["pretext_accuracy"]) if same_task else "–"
        ours = [_diff(pairs, value) for _, value in measures]
        body.append([claim, f"{_name(a)} − {_name(b)}", paper, acc] + ours + [str(len(pairs))])
    return md(header, body)
