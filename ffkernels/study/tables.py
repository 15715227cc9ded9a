"""Markdown-table helpers shared by report.md, the claims table and the plots: rows grouped by run, mean ± std."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .algos import ALGOS
from .pretext import PRETEXTS

ALGO_NAMES = {name: a.label for name, a in ALGOS.items()}


def mean_std(values, percent: bool = True, digits: int = 1, signed: bool = False) -> str:
    """"93.1 ± 0.4" (sample std over seeds) or "93.1" for one value; "–" for none. ``signed`` writes "+1.2"
    (differences)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64) * (100.0 if percent else 1.0)
    if v.size == 0:
        return "–"
    m = v.mean()
    m = 0.0 if round(m, digits) == 0 else m          # no "-0.0"
    head = f"{m:{'+' if signed else ''}.{digits}f}"
    return head if v.size == 1 else f"{head} ± {v.std(ddof=1):.{digits}f}"


def grouped(rows) -> dict:
    """{(dataset, pretext, algo): [rows sorted by seed]}."""
    g = defaultdict(list)
    for r in rows:
        g[(r["dataset"], r["pretext"], r["algo"])].append(r)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in g.items()}


def order(rows):
    """(datasets, pretexts, algos) present in ``rows``, datasets as they come, the rest in registry order."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    present = {r["pretext"] for r in rows}
    pretexts = [p for p in PRETEXTS if p in present]
    algos = [a for a in ALGO_NAMES if any(r["algo"] == a for r in rows)]
    return datasets, pretexts, algos


def md(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def reported_header(dataset: str, what: str) -> str:
    """The column of the paper's reported numbers: MNIST's, marked so on another dataset (the secondary summary has
    no transfer rows for the others: MNIST's are the reference pattern there)."""
    if dataset in ("mnist", "mnist5k"):
        return f"paper (reported) {what}"
    return f"paper on MNIST (reported; {dataset} not reported) {what}"
