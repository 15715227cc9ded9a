"""``ffkernels data``: which datasets can be loaded here, and where each was found (or how to get it)."""
from __future__ import annotations

import json

from .data import LOADERS, locate


def add_arguments(p) -> None:
    p.add_argument("--data-root", default=None,
                   help="look here instead of the default data root ($FFKERNELS_DATA or ~/.cache/ffkernels/data) "
                        "and the system folders")
    p.add_argument("--json", action="store_true", help="print JSON")


def collect(data_root=None) -> dict:
    return {name: dict(zip(("available", "where"), locate(name, data_root))) for name in LOADERS}


def run(args) -> dict:
    found = collect(args.data_root)
    if args.json:
        print(json.dumps(found, indent=2))
        return found
    for name, entry in found.items():
        state = "available" if entry["available"] else "missing  "
        where = entry["where"].removeprefix("ffkernels: ")
        print(f"{name:14s} {state}  {where}")
    return found
