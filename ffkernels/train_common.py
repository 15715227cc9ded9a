"""What ``ffkernels train`` does alike in one process (train_cli) and over torchrun (distributed.cli): the FFNet
built from the parsed options, the header, per-epoch and summary lines it prints, and writing --save and --json."""
from __future__ import annotations

import json
import time

import torch

from .net import FFNet
from .schedules import linear_cooldown, make_schedule
from .training import History

# The recipe options of ``ffkernels train`` (issue 10): (attribute, flag, value when off, default). The defaults are
# the recipe that measured best on mnist5k (README, "ffkernels train"); the command line leaves them None when not
# given, so that resolve_recipe can tell a default from an explicit choice.
RECIPE_OPTIONS = (("head", "--head", False, True), ("lr_schedule", "--lr-schedule", "constant", "cooldown"),
                  ("negatives", "--negatives", "random", "hard"), ("jitter", "--jitter", 0, 1),
                  ("peer_norm", "--peer-norm", 0.0, 0.03))


# Each dataset's own defaults for ``ffkernels train`` (over add_arguments' and RECIPE_OPTIONS'; explicit flags win),
# tuned on a validation split of that dataset's training set (``--validation``); README "Main jobs" has the runs.
DATASET_DEFAULTS = {
    "fashion-mnist": {"lr": 1e-3, "jitter": 0, "head_layers": [0, 1, 2], "epochs": 20},
}


def recipe_default(attr: str):
    return next(d for a, _, _, d in RECIPE_OPTIONS if a == attr)


def resolve_recipe(args, supported=None, what: str = "here") -> list:
    """Fill in the recipe options the command line left out (None): their defaults, or, for an option outside
    ``supported`` (None: all are), its off value. Returns the flags set off that way; SystemExit for an
    explicitly given option outside ``supported``."""
    turned_off, refused = [], []
    for attr, flag, off, default in RECIPE_OPTIONS:
        value = getattr(args, attr, None)
        ok = supported is None or attr in supported
        if value is None:
            setattr(args, attr, default if ok else off)
            if not ok and default != off:
                turned_off.append(flag)
        elif not ok and value != off:
            refused.append(flag)
    if refused:
        raise SystemExit(f"ffkernels train: {', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not "
                         f"supported {what}; leave it out" + (" or train in one process" if what == "here" else ""))
    return turned_off


def recipe_dict(args) -> dict:
    """The recipe options of a parsed ``ffkernels train`` command line (for --json)."""
    keys = ("head", "head_layers", "head_optimizer", "head_lr", "head_weight_decay", "lr_schedule",
            "cooldown_fraction", "negatives", "jitter", "peer_norm", "predict")
    return {k: getattr(args, k, None) for k in keys}


def recipe_summary(args) -> str:
    """The header's description of the recipe options in use ("" when none)."""
    parts = []
    if getattr(args, "head", False):
        parts.append(f"head ({args.head_optimizer} lr {args.head_lr:g}, wd {args.head_weight_decay:g})")
    if getattr(args, "lr_schedule", "constant") != "constant":
        parts.append(f"lr schedule {args.lr_schedule}")
    if getattr(args, "negatives", "random") != "random":
        parts.append(f"{args.negatives} negatives")
    if getattr(args, "jitter", 0):
        parts.append(f"jitter +-{args.jitter} px")
    if getattr(args, "peer_norm", 0.0):
        parts.append(f"peer norm {args.peer_norm:g}")
    return "".join(f", {p}" for p in parts)


def build_net(args, in_features: int, num_classes: "int | None" = None) -> FFNet:
    """The FFNet of the parsed options."""
    kw = {"peer_norm": getattr(args, "peer_norm", 0.0)}
    if getattr(args, "head", False):
        kw.update(head=True, num_classes=num_classes, head_layers=getattr(args, "head_layers", None),
                  head_optimizer=args.head_optimizer, head_lr=args.head_lr,
                  head_weight_decay=args.head_weight_decay)
    return FFNet([in_features, *args.hidden], goodness=args.goodness, threshold=args.threshold, loss=args.loss,
                 threshold_neg=getattr(args, "threshold_neg", None), scff_lambda=getattr(args, "scff_lambda", 0.0),
                 norm=args.norm, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                 weight_decay=args.weight_decay, backend=args.backend, device=args.device, **kw)


def check_output_paths(args) -> None:
    """SystemExit (one line) before any training when --save or --json names a file in a folder that does not exist:
    a long run must not end in a traceback when it writes its results."""
    import os
    for flag in ("save", "json"):
        path = getattr(args, flag, None)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise SystemExit(f"ffkernels train: --{flag} {path!r}: the folder {folder!r} does not exist")


def load_checkpoint(net, path: str, device) -> None:
    """Load a --save'd state_dict into ``net``; SystemExit naming the file when it cannot be read or does not fit."""
    try:
        state = torch.load(path, map_location=device)
    except Exception as e:  # missing, unreadable, truncated or not a torch file
        raise SystemExit(f"ffkernels train: cannot read checkpoint {path!r}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None  # one line: torch's unpickler errors span several
    try:
        net.load_state_dict(state)
    except Exception as e:  # another net's checkpoint: missing or unexpected keys, other shapes
        raise SystemExit(f"ffkernels train: checkpoint {path!r} does not fit this net: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None


def lr_schedule(args, n_train: int):
    """The learning-rate multiplier f(step) of ``--lr-schedule`` over this run's steps (``--epochs`` epochs of
    ``n_train`` rows in batches of ``--batch-size``), or None when it is constant or there are no steps."""
    steps = args.epochs * -(-n_train // args.batch_size)
    if args.lr_schedule == "constant" or not steps:
        return None
    if args.lr_schedule == "cooldown":
        return linear_cooldown(steps, args.cooldown_fraction)
    return make_schedule(args.lr_schedule, steps)


def run_epochs(args, train_epoch, evaluate, split: str = "test", verbose: bool = True):
    """(History, seconds): ``--epochs`` epochs of ``train_epoch(epoch) -> EpochStats``, ``evaluate() -> accuracy``
    every ``--eval-every`` epochs and after the last, one ``epoch_line`` per epoch when ``verbose``."""
    hist = History()
    t_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        st = train_epoch(epoch)
        st.epoch = epoch
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            st.test_accuracy = evaluate()
        hist.epochs.append(st)
        if verbose:
            print(epoch_line(st, split), flush=True)
    return hist, time.perf_counter() - t_start


def model_dict(args) -> dict:
    """The net's options for --json: the MLP's widths, or the CNN's channels, kernel and pooling."""
    if getattr(args, "model", "mlp") == "cnn":
        return {"model": "cnn", "conv_block": args.conv_block, "norm": args.norm, "channels": args.channels, "kernel_size": args.kernel_size,
                "pool_after": args.pool_after, "loss": args.loss, "temperature": args.temperature,
                "goodness": args.goodness, "goodness_power": args.goodness_power}
    loss = getattr(args, "loss", "")
    extra = ({"loss": "competitive", "temperature": args.temperature} if loss == "competitive" else
             {"loss": "scff", "threshold_neg": args.threshold_neg, "scff_lambda": args.scff_lambda} if loss == "scff"
             else {})
    return {"hidden": args.hidden, **extra}


def describe(ds, args, backend: str, device, extra: str = "") -> str:
    from .cnn import net_summary
    where = f"\n  data: {ds.source}" if getattr(ds, "source", "") else ""
    return (f"ffkernels train: {ds}{where}\n  net {net_summary(args, ds)}, backend "
            f"{backend!r} on {device} ({torch.get_num_threads()} threads){extra}, {args.epochs} epochs, "
            f"batch {args.batch_size}, " + (f"adam lr {args.bp_lr:g}" if getattr(args, "algo", "ff") == "bp"
                                            else f"{args.optimizer} lr {args.lr:g}"))


def epoch_line(st, split: str = "test") -> str:
    """One epoch's line; ``split``: what the accuracy was measured on (test, or validation with --validation)."""
    acc = f"{split} acc {st.test_accuracy:.2%}" if st.test_accuracy is not None else ""
    head = f"  head {st.head_loss:.4f}" if getattr(st, "head_loss", None) is not None else ""
    return (f"epoch {st.epoch:3d}  loss {' '.join(f'{v:.4f}' for v in st.loss)}{head}  {st.samples_per_s:8.0f} "
            f"samples/s  {acc}")


def finish(args, result: dict, state_dict) -> dict:
    """Print the summary and write --save (the FFNet state_dict) and --json."""
    if result["epochs"]:
        print(f"done: {result.get('eval_split', 'test')} accuracy {result['test_accuracy']:.2%} after {args.epochs} "
              f"epochs in {result['wall_seconds']:.1f} s (backend {result['backend']!r})")
    else:
        print("done: no epochs run")
    if args.save:
        torch.save(state_dict, args.save)
        print(f"saved {args.save}")
    if args.json:
        if getattr(args, "command_line", None):
            result = {"command": " ".join(args.command_line), **result}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
