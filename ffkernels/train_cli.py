"""``ffkernels train``: supervised Forward-Forward training of an FFNet on an offline dataset.

The options and the single-process run live here; ``--distributed data|pipeline`` hands the parsed options to
distributed.cli. What both kinds of run share (the net, the printed lines, --save and --json) is in train_common.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli_options import HelpFormatter, add_ff_loss_options, add_ff_optimizer_options, add_run_options
from .data import LOADERS, load_dataset
from .train_common import build_net, describe, epoch_line, finish
from .training import History, accuracy, train_ff_epoch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist5k", choices=sorted(LOADERS), help="dataset (default: mnist5k, embedded)")
    p.add_argument("--data-root", default=None, help="folder of downloaded datasets (torchvision ones)")
    p.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000, 1000], help="layer widths")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=100, help="real samples (positive-negative pairs) per step")
    add_ff_optimizer_options(p)
    add_ff_loss_options(p)
    add_run_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    p.add_argument("--eval-every", type=int, default=1,
                   help="evaluate the test split every N epochs and after the last")
    p.add_argument("--save", default=None, help="write the trained FFNet state_dict here")
    p.add_argument("--resume", default=None, help="start from a saved state_dict (optimizer state included)")
    p.add_argument("--json", default=None, help="write the per-epoch history as JSON here")
    p.add_argument("--first-layer", default="shared", choices=["shared", "pair"],
                   help="shared (default): the first layer computes what a positive and its negative share once "
                        "(FFNet.ff_step_labeled, B-row GEMMs); pair: build explicit x_pos/x_neg (2B rows). Same "
                        "math and data, different rounding; --distributed modes always use pairs")
    p.add_argument("--distributed", default="none", choices=["none", "data", "pipeline"],
                   help="train over the processes started by torchrun: 'data' (each rank a shard of every batch) or "
                        "'pipeline' (each rank a stage of consecutive layers); see docs/distributed.md")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="--distributed pipeline: split every batch into this many micro-batches (default: 1)")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="--distributed: seconds after which a stuck collective or transfer fails")


def run(args) -> dict:
    if getattr(args, "distributed", "none") != "none":
        from .distributed.cli import run as run_distributed

        return run_distributed(args)
    if getattr(args, "micro_batches", None) is not None:
        raise SystemExit("ffkernels train: --micro-batches only applies to --distributed pipeline")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = load_dataset(args.dataset, data_root=args.data_root)
    net = build_net(args, ds.in_features)
    if args.resume:
        net.load_state_dict(torch.load(args.resume, map_location=args.device))
    print(describe(ds, args, net.backend, args.device), flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    hist = History()
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        st = train_ff_epoch(net, ds.x_train, ds.y_train, ds.num_classes, args.batch_size, gen,
                            progress=not args.no_progress, desc=f"epoch {epoch}/{args.epochs}",
                            shared_first_layer=args.first_layer == "shared")
        st.epoch = epoch
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            st.test_accuracy = accuracy(net, ds.x_test, ds.y_test, ds.num_classes)
        hist.epochs.append(st)
        print(epoch_line(st), flush=True)
    total = time.perf_counter() - t_start
    result = {"dataset": ds.name, "hidden": args.hidden, "epochs": args.epochs, "backend": net.backend,
              "device": str(args.device), "threads": torch.get_num_threads(),
              "test_accuracy": hist.epochs[-1].test_accuracy if hist.epochs else None,
              "wall_seconds": total, **hist.to_dict()}
    return finish(args, result, net.state_dict())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="ffkernels train", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
