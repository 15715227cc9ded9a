"""What ``ffkernels train`` does alike in one process (train_cli) and over torchrun (distributed.cli): the FFNet
built from the parsed options, the header, per-epoch and summary lines it prints, and writing --save and --json."""
from __future__ import annotations

import json

import torch

from .layers import FFNet


def build_net(args, in_features: int) -> FFNet:
    return FFNet([in_features, *args.hidden], goodness=args.goodness, threshold=args.threshold, loss=args.loss,
                 norm=args.norm, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, backend=args.backend, device=args.device)


def describe(ds, args, backend: str, device, extra: str = "") -> str:
    return (f"ffkernels train: {ds}\n  net {ds.in_features}-{'-'.join(map(str, args.hidden))}, backend "
            f"{backend!r} on {device} ({torch.get_num_threads()} threads){extra}, {args.epochs} epochs, "
            f"batch {args.batch_size}")


def epoch_line(st) -> str:
    acc = f"test acc {st.test_accuracy:.2%}" if st.test_accuracy is not None else ""
    return (f"epoch {st.epoch:3d}  loss {' '.join(f'{v:.4f}' for v in st.loss)}  {st.samples_per_s:8.0f} samples/s  "
            f"{acc}")


def finish(args, result: dict, state_dict) -> dict:
    """Print the summary and write --save (the FFNet state_dict) and --json."""
    if result["epochs"]:
        print(f"done: test accuracy {result['test_accuracy']:.2%} after {args.epochs} epochs in "
              f"{result['wall_seconds']:.1f} s (backend {result['backend']!r})")
    else:
        print("done: no epochs run")
    if args.save:
        torch.save(state_dict, args.save)
        print(f"saved {args.save}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
