"""``ffkernels train``: supervised Forward-Forward training of an FFNet on an offline dataset.

The options and the single-process run live here; ``--distributed data|pipeline`` hands the parsed options to
distributed.cli. What both kinds of run share (the net, the printed lines, --save and --json) is in train_common.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .augment import check_image_shape
from .cnn import add_cnn_options, build_competitive_net, check_cnn_options, input_shape, model_defaults
from .cli_options import (
    HelpFormatter,
    add_ff_loss_options,
    add_ff_optimizer_options,
    add_precision_option,
    add_run_options,
    add_scff_options,
    check_scff_options,
    nonnegative_int,
    peek_option,
    positive_int,
    show_progress,
)
from .config import OPTIMIZERS
from .data import LOADERS, load_dataset, validation_split
from .net import NEGATIVES, PREDICT_METHODS
from .precision import precision_context
from .schedules import SCHEDULES, LRScheduler
from .train_common import (
    DATASET_DEFAULTS,
    build_net,
    check_output_paths,
    describe,
    model_dict,
    finish,
    load_checkpoint,
    lr_schedule,
    recipe_default,
    recipe_dict,
    recipe_summary,
    resolve_recipe,
    run_epochs,
)
from .train_bp import BP_RECIPE, train_bp
from .training import accuracy, train_competitive_epoch, train_ff_epoch

COMPETITIVE_RECIPE = ("lr_schedule", "jitter")  # the recipe options that apply to --loss competitive


def _default(attr: str) -> str:
    """How --help states a recipe option's default (train_common.RECIPE_OPTIONS), and any dataset's own."""
    value = recipe_default(attr)
    own = "".join(f"; {name}: {d[attr]}" for name, d in DATASET_DEFAULTS.items() if attr in d)
    return f"default: {'on' if value is True else value}{own}"


def _dataset_defaults_text() -> str:
    """train_common.DATASET_DEFAULTS as flags, for --help."""
    def flag(key, value):
        return f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
    return "; ".join(f"{name}: {', '.join(flag(k, v) for k, v in d.items())}" for name, d in DATASET_DEFAULTS.items())


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The recipe parts of issue 10 above the kernels: head, lr schedule, hard negatives, jitter, peer norm.

    Their defaults (train_common.RECIPE_OPTIONS) are the recipe; with --distributed, the parts it does not support
    are off unless given explicitly, which is refused."""
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=None,
                   help=f"({_default('head')}) train a linear softmax head on the RMS-normalized neutral-label activities of layers 2..L "
                        "(cross-entropy, its own optimizer; its gradient never enters the FF layers); prediction then "
                        "takes one pass instead of one per label")
    p.add_argument("--head-layers", type=int, nargs="+", default=None, metavar="L",
                   help="the layers (0-based, negative from the end) whose activities the head reads (default: "
                        "layers 2..L, FFNet's predict_layers; fashion-mnist: 0 1 2)")
    p.add_argument("--head-optimizer", default="adam", choices=OPTIMIZERS,
                   help="the head's optimizer (sgd: momentum 0.9)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="the head's learning rate")
    p.add_argument("--head-weight-decay", type=float, default=0.0, help="the head's weight decay")
    p.add_argument("--lr-schedule", default=None, choices=sorted(SCHEDULES),
                   help=f"({_default('lr_schedule')}) learning-rate multiplier over this run's steps, for every layer and the head: constant; "
                        "cooldown (constant, then linear to 0 over the last --cooldown-fraction); cosine. A --resume'd "
                        "run starts its own schedule")
    p.add_argument("--cooldown-fraction", type=float, default=0.5, help="--lr-schedule cooldown: the decaying part")
    p.add_argument("--negatives", default=None, choices=NEGATIVES,
                   help=f"({_default('negatives')}) wrong label of each negative: random (uniform), or hard (drawn from the model's own scores, "
                        "the true label excluded: the head's logits with --head, else every label's goodness, "
                        "which costs a forward pass per label)")
    p.add_argument("--jitter", type=int, default=None,
                   help=f"({_default('jitter')}) shift each training image by a random offset of up to +-K pixels (0: off; image datasets only)")
    p.add_argument("--peer-norm", type=float, default=None,
                   help=f"({_default('peer_norm')}) peer-normalization coefficient of every layer (0: off)")
    p.add_argument("--predict", default=None, choices=PREDICT_METHODS,
                   help="how the test accuracy is measured (default: head with --head, else goodness)")


def check_recipe_options(args, ds) -> None:
    """SystemExit for recipe options that do not fit together or with the dataset."""
    if args.predict == "head" and not args.head:
        raise SystemExit("ffkernels train: --predict head needs --head")
    if args.jitter < 0:
        raise SystemExit(f"ffkernels train: --jitter must be >= 0, got {args.jitter}")
    if args.jitter:
        try:
            check_image_shape(ds.image_shape, ds.in_features, "--jitter")
        except ValueError as e:
            raise SystemExit(f"ffkernels train: dataset {ds.name!r}: {e}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist5k", choices=sorted(LOADERS),
                   help="dataset (default: mnist5k, embedded). A dataset's own defaults replace the ones shown "
                        f"here (explicit flags win): {_dataset_defaults_text()}")
    p.add_argument("--data-root", default=None,
                   help="folder of on-disk datasets (default: $FFKERNELS_DATA or ~/.cache/ffkernels/data, then "
                        "system folders such as Debian's dataset-fashion-mnist; `ffkernels data` lists them)")
    p.add_argument("--download", action="store_true", help="download a missing on-disk dataset with torchvision")
    p.add_argument("--validation", type=positive_int, default=None, metavar="N",
                   help="hold out N training images (a fixed draw) and evaluate on them instead of the test split: "
                        "for tuning; the test split is not evaluated")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[1000, 1000, 1000], help="layer widths")
    p.add_argument("--epochs", type=nonnegative_int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=100,
                   help="real samples (positive-negative pairs) per step")
    add_ff_optimizer_options(p)
    add_ff_loss_options(p)
    add_scff_options(p)
    add_run_options(p)
    add_precision_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batches")
    p.add_argument("--eval-every", type=positive_int, default=1,
                   help="evaluate the test split every N epochs and after the last")
    p.add_argument("--save", default=None, help="write the trained FFNet state_dict here")
    p.add_argument("--resume", default=None, help="start from a saved state_dict (optimizer state included)")
    p.add_argument("--json", default=None, help="write the per-epoch history as JSON here")
    p.add_argument("--first-layer", default="shared", choices=["shared", "pair"],
                   help="shared (default): the first layer computes what a positive and its negative share once "
                        "(FFNet.ff_step_labeled, B-row GEMMs); pair: build explicit x_pos/x_neg (2B rows). Same "
                        "math and data, different rounding; --distributed modes always use pairs")
    add_recipe_options(p)
    p.add_argument("--algo", default="ff", choices=["ff", "bp"],
                   help="ff: Forward-Forward (the FFNet and its recipe); bp: the backprop baseline on the same net, "
                        "data, batches and epochs (BPMLP + linear head, Adam at --bp-lr; of the recipe only "
                        "--lr-schedule and --jitter apply), for side-by-side numbers")
    p.add_argument("--bp-lr", type=float, default=1e-3, help="--algo bp: Adam's learning rate")
    p.add_argument("--distributed", default="none", choices=["none", "data", "pipeline"],
                   help="train over the processes started by torchrun: 'data' (each rank a shard of every batch) or "
                        "'pipeline' (each rank a stage of consecutive layers); see docs/distributed.md")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="--distributed pipeline: split every batch into this many micro-batches (default: 1)")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="--distributed: seconds after which a stuck collective or transfer fails")
    add_cnn_options(p)


def run(args) -> dict:
    check_output_paths(args)
    check_scff_options(args, "train")
    if getattr(args, "precision", "fp32") != "fp32" and getattr(args, "distributed", "none") != "none":
        raise SystemExit("ffkernels train: --precision bf16 is not supported with --distributed yet")
    if getattr(args, "distributed", "none") != "none" and (args.model != "mlp" or args.loss == "competitive"):
        raise SystemExit("ffkernels train: --model cnn and --loss competitive are not supported with --distributed yet")
    if getattr(args, "distributed", "none") != "none":
        from .distributed.cli import run as run_distributed

        return run_distributed(args)
    if getattr(args, "micro_batches", None) is not None:
        raise SystemExit("ffkernels train: --micro-batches only applies to --distributed pipeline")
    competitive = args.loss == "competitive"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = load_dataset(args.dataset, data_root=args.data_root, download=getattr(args, "download", False))
    if getattr(args, "validation", None):
        try:
            ds = validation_split(ds, args.validation)
        except ValueError as e:
            raise SystemExit(f"ffkernels train: --validation: {e}") from None
    if args.jitter is None and not ds.image_shape:  # the default jitter is for image datasets only
        args.jitter = 0
    algo = getattr(args, "algo", "ff")
    if algo == "bp":
        resolve_recipe(args, supported=BP_RECIPE, what="with --algo bp")
    elif competitive:
        resolve_recipe(args, supported=COMPETITIVE_RECIPE, what="with --loss competitive (no labels in the input)")
    else:
        resolve_recipe(args)
    check_recipe_options(args, ds)
    check_cnn_options(args, ds.image_shape, ds.num_classes)
    if algo == "bp":
        print(describe(ds, args, "autograd (BP)", args.device, recipe_summary(args)), flush=True)
        with precision_context(getattr(args, "precision", "fp32"), args.device):  # bf16: torch.autocast
            result, state = train_bp(args, ds, show_progress(args))
        return finish(args, {**result, "precision": getattr(args, "precision", "fp32")}, state)
    try:
        net = (build_competitive_net(args, ds) if competitive else build_net(args, ds.in_features, ds.num_classes))
    except (ValueError, TypeError) as e:  # an option the layers refuse (FFConfig's checks, a bad device...)
        raise SystemExit(f"ffkernels train: {e}") from None
    if args.resume:
        load_checkpoint(net, args.resume, args.device)
    print(describe(ds, args, net.backend, args.device, recipe_summary(args)), flush=True)
    fn = lr_schedule(args, len(ds.y_train))
    scheduler = LRScheduler(net, fn) if fn is not None else None
    gen = torch.Generator().manual_seed(args.seed)

    shape = input_shape(args, ds)

    def train_epoch(epoch):
        if competitive:
            return train_competitive_epoch(net, ds.x_train, ds.y_train, args.batch_size, gen,
                                           progress=show_progress(args), desc=f"epoch {epoch}/{args.epochs}",
                                           shape=shape, jitter=args.jitter, image_shape=ds.image_shape,
                                           scheduler=scheduler)
        return train_ff_epoch(net, ds.x_train, ds.y_train, ds.num_classes, args.batch_size, gen,
                              progress=show_progress(args), desc=f"epoch {epoch}/{args.epochs}",
                              shared_first_layer=args.first_layer == "shared", negatives=args.negatives,
                              jitter=args.jitter, image_shape=ds.image_shape, scheduler=scheduler)

    with precision_context(getattr(args, "precision", "fp32"), args.device):  # bf16: torch.autocast, fp32 masters
        hist, total = run_epochs(args, train_epoch,
                                 lambda: accuracy(net, ds.x_test, ds.y_test, ds.num_classes, method=args.predict,
                                                  shape=shape),
                                 ds.eval_split)
    result = {"algo": "ff", "dataset": ds.name, "eval_split": ds.eval_split, **model_dict(args),
              "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
              "backend": net.backend, "device": str(args.device),
              "threads": torch.get_num_threads(), "recipe": recipe_dict(args),
              "precision": getattr(args, "precision", "fp32"),
              "test_accuracy": hist.epochs[-1].test_accuracy if hist.epochs else None,
              "wall_seconds": total, **hist.to_dict()}
    return finish(args, result, net.state_dict())


def preset_defaults(argv) -> dict:
    """The defaults of ``--model cnn`` (cnn.CNN_DEFAULTS and its dataset's) or else of the dataset ``--dataset NAME``
    in ``argv`` names (train_common.DATASET_DEFAULTS; {} for one without its own), set on the parser before parsing
    so that explicit flags still win."""
    dataset = peek_option(argv, "--dataset")
    return model_defaults(argv, dataset) or dict(DATASET_DEFAULTS.get(dataset, {}))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="ffkernels train", description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(**preset_defaults(argv))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
