"""``ffkernels demo``: a short FF-vs-BP study on the embedded MNIST subset (supervised and rotation pretext
tasks, one seed, a small network) that finishes in a few minutes on a laptop CPU and prints the table."""
from __future__ import annotations

import argparse

from ..cli_options import HelpFormatter, positive_int
from .cli import add_device_arguments, execute
from .config import StudyConfig

DEMO_DATASET = "mnist5k"
DEMO_PRETEXTS = ("supervised", "rotation")
DEMO_CONFIG = StudyConfig(hidden=(500, 500, 500), epochs=10, tsne_points=500, eval_every=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="ffkernels-demo", help="output folder (results.json, report.md, plots)")
    p.add_argument("--epochs", type=positive_int, default=DEMO_CONFIG.epochs, help="training epochs per run")
    add_device_arguments(p)


def run(args):
    from dataclasses import replace

    cfg = replace(DEMO_CONFIG, epochs=args.epochs)
    print(f"ffkernels demo: FF vs BP on {DEMO_DATASET}, pretext tasks {', '.join(DEMO_PRETEXTS)}, network "
          f"784-{'-'.join(map(str, cfg.hidden))}, {cfg.epochs} epochs (the full study: ffkernels study -h)")
    return execute(args, [DEMO_DATASET], list(DEMO_PRETEXTS), ["ff", "bp"], [0], cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ffkernels demo", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
