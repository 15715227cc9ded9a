"""docs/study.md's generated blocks: the paper preset's settings, and the tables of the kept paper-preset run
(docs/study-paper/results.json). Each block sits between

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

from .claims import claims_table
from .report import baseline_lines, paper_settings_table, paper_table, timing_line, wall_table

DATASET = "mnist5k"
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DOC = os.path.join(ROOT, "docs", "study.md")
RESULTS = os.path.join(ROOT, "docs", "study-paper", "results.json")

BLOCKS = {
    "paper-settings": lambda res: paper_settings_table(),
    "paper-table": lambda res: paper_table(res["rows"], DATASET),
    "paper-references": lambda res: baseline_lines(res["baselines"].get(DATASET)),
    "paper-claims": lambda res: claims_table(res["rows"], res["baselines"].get(DATASET), DATASET),
    "paper-walltimes": lambda res: wall_table(res["rows"], DATASET) + "\n\n" + timing_line(res["rows"], DATASET),
}
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)(<!-- end generated: (?P=name) -->)",
                    re.S)


def refresh(text: str, results: dict) -> str:
    """``text`` with every generated block rewritten from ``results`` (an unknown block name is an error)."""
    def one(m):
        name = m.group("name")
        if name not in BLOCKS:
            raise KeyError(f"docs block {name!r} has no generator; known: {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[name](results) + "\n" + m.group(4)
    return _BLOCK.sub(one, text)


def block_names(text: str) -> list:
    return [m.group("name") for m in _BLOCK.finditer(text)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Rewrite docs/study.md's generated blocks from the kept paper run.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--doc", default=os.path.normpath(DOC))
    ap.add_argument("--results", default=os.path.normpath(RESULTS))
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
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
