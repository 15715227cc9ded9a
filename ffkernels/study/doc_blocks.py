"""docs/study.md's generated blocks: the paper preset's settings, and the tables of the kept paper-preset runs
(mnist5k: docs/study-paper/results.json, blocks ``paper-*``; full Fashion-MNIST: docs/study-fashion-mnist/results.json,
blocks ``fmnist-*``). Each block sits between

    <!-- generated: NAME ... -->
    ...
    <!-- end generated: NAME -->

and is rewritten from its source, never typed. ``python -m ffkernels.study.doc_blocks`` refreshes docs/study.md
after the run has grown; tests/test_study_paper.py fails while a block is stale.
"""
from __future__ import annotations

import argparse
import json
import os
import re

from . import below_chance
from .claims import claims_table
from .report import baseline_lines, layer_table, paper_settings_table, paper_table, timing_line, wall_table

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DOC = os.path.join(ROOT, "docs", "study.md")
# block-name prefix -> (the kept run's results.json, its dataset)
SOURCES = {"paper": (os.path.join(ROOT, "docs", "study-paper", "results.json"), "mnist5k"),
           "fmnist": (os.path.join(ROOT, "docs", "study-fashion-mnist", "results.json"), "fashion-mnist"),
           "scff5k": (os.path.join(ROOT, "docs", "scff-mnist5k", "results.json"), "mnist5k"),
           "below": (os.path.join(ROOT, "docs", "below-chance", "results.json"), None)}
RESULTS = SOURCES["paper"][0]
DATASET = SOURCES["paper"][1]

_TABLES = {  # block-name suffix -> generator(results, dataset)
    "table": lambda res, ds: paper_table(res["rows"], ds),
    "references": lambda res, ds: baseline_lines(res["baselines"].get(ds)),
    "claims": lambda res, ds: claims_table(res["rows"], res["baselines"].get(ds), ds),
    "walltimes": lambda res, ds: wall_table(res["rows"], ds) + "\n\n" + timing_line(res["rows"], ds),
    "layers": lambda res, ds: layer_table(res["rows"], ds),
}
# block name -> (source prefix or None, generator(results))
BLOCKS = {"paper-settings": (None, lambda res: paper_settings_table())}
_KINDS = {"scff5k": ("layers", "references")}  # the blocks a source has
_DEFAULT_KINDS = ("table", "references", "claims", "walltimes")
BLOCKS.update({f"{src}-{name}": (src, lambda res, fn=fn, ds=ds: fn(res, ds))
               for src, (_, ds) in SOURCES.items() if ds for name, fn in _TABLES.items()
               if name in _KINDS.get(src, _DEFAULT_KINDS)})
BLOCKS["below-chance"] = ("below", lambda res: below_chance.markdown(res).rstrip("\n"))
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                    re.S)


def refresh(text: str, results: dict) -> str:
    """``text`` with every generated block rewritten from ``results``: {source prefix: that run's results.json}, or
    one results.json for the ``paper`` blocks. An unknown block name, or a block whose source is missing, is an
    error."""
    if "rows" in results:
        results = {"paper": results}

    def one(m):
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"docs block {name!r} has no generator; known: {', '.join(BLOCKS)}")
        src, gen = BLOCKS[name]
        if src is not None and src not in results:
            raise KeyError(f"docs block {name!r} needs the {src!r} results ({SOURCES[src][0]})")
        return m.group(1) + gen(results.get(src)) + "\n" + m.group(4)
    return _BLOCK.sub(one, text)


def load_sources(paths: dict) -> dict:
    """{prefix: results} for every source whose results.json exists."""
    out = {}
    for src, path in paths.items():
        if os.path.exists(path):
            with open(path) as f:
                out[src] = json.load(f)
    return out


def block_names(text: str) -> list:
    return [m.group("name") for m in _BLOCK.finditer(text)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Rewrite docs/study.md's generated blocks from the kept paper run.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--doc", default=os.path.normpath(DOC))
    ap.add_argument("--results", default=os.path.normpath(RESULTS), help="the mnist5k paper run (paper-* blocks)")
    ap.add_argument("--fmnist-results", default=os.path.normpath(SOURCES["fmnist"][0]),
                    help="the Fashion-MNIST run (fmnist-* blocks)")
    args = ap.parse_args(argv)
    results = load_sources({**{k: path for k, (path, _) in SOURCES.items()}, "paper": args.results,
                            "fmnist": args.fmnist_results})
    with open(args.doc) as f:
        text = f.read()
    new = refresh(text, results)
    if new != text:
        with open(args.doc, "w") as f:
            f.write(new)
    print(f"{args.doc}: {len(block_names(text))} generated blocks, "
          f"{'changed' if new != text else 'already current'}")


if __name__ == "__main__":
    main()
