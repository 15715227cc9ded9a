"""Command-line options the ``ffkernels`` commands share, with their choices and defaults taken from the library:
config.py for the FF-layer options (choices and FFConfig() defaults), the backend registry for --backend. Plus the
help formatter every command uses, so ``-h`` shows each option's default."""
from __future__ import annotations

import argparse
import sys

import torch

from .backends import BACKEND_NAMES
from .config import GOODNESS, LOSSES, NORMS, OPTIMIZERS, FFConfig
from .precision import PRECISIONS

FF_DEFAULTS = FFConfig()
BACKEND_CHOICES = ("auto", *BACKEND_NAMES)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each option's default appended to its help as "(default: ...)", unless the help
    already speaks of its default, the default is None (nothing given) or the option is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or action.nargs == 0
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


def peek_option(argv, flag: str):
    """The value ``argv`` gives ``flag`` (None when absent), read before the real parse: for a command's
    ``preset_defaults``, which set defaults from one option so that explicit flags still win."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(flag, default=None)
    known, _ = p.parse_known_args(argv)
    return getattr(known, flag.lstrip("-").replace("-", "_"))


def show_progress(args) -> bool:
    """Progress bars only on a terminal and without --no-progress: a log file gets the plain per-epoch / per-run
    lines the commands print anyway, not bars redrawn with cursor codes."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _bounded_int(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.__name__ = f"int >= {lo}"
    return parse


positive_int = _bounded_int(1, ">= 1")
nonnegative_int = _bounded_int(0, ">= 0")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_ff_loss_options(p: argparse.ArgumentParser, norm_help: str = "normalization of each layer's input",
                        losses=LOSSES, loss_help: str = "FF loss") -> None:
    """--goodness, --threshold, --loss (one of ``losses``), --norm: what an FF layer computes its local loss from."""
    d = FF_DEFAULTS
    p.add_argument("--goodness", default=d.goodness, choices=GOODNESS,
                   help="FF goodness: sum or mean of the squared activations")
    p.add_argument("--threshold", type=float, default=None,
                   help="goodness threshold (default: the layer width for sum goodness, 1 for mean)")
    p.add_argument("--loss", default=d.loss, choices=losses, help=loss_help)
    p.add_argument("--norm", default=d.norm, choices=NORMS, help=norm_help)


def add_scff_options(p: argparse.ArgumentParser) -> None:
    """--threshold-neg, --scff-lambda: the scff loss's own options (``check_scff_options`` refuses them elsewhere)."""
    p.add_argument("--threshold-neg", type=float, default=None,
                   help="--loss scff: the negatives' goodness threshold (default: --threshold)")
    p.add_argument("--scff-lambda", type=float, default=FF_DEFAULTS.scff_lambda,
                   help="--loss scff: the penalty lambda on the positives' goodness, lambda |g+| per pair")


def check_scff_options(args, command: str) -> None:
    """SystemExit (one line) when --threshold-neg or --scff-lambda is given with a loss other than scff, which would
    ignore it."""
    given = [flag for flag, value in (("--threshold-neg", getattr(args, "threshold_neg", None) is not None),
                                      ("--scff-lambda", getattr(args, "scff_lambda", 0.0) != 0.0)) if value]
    if given and args.loss != "scff":
        raise SystemExit(f"ffkernels {command}: {' and '.join(given)} apply to --loss scff only, "
                         f"got --loss {args.loss}")


def add_ff_optimizer_options(p: argparse.ArgumentParser) -> None:
    """--optimizer, --lr, --momentum, --weight-decay: the fused update of every FF layer."""
    d = FF_DEFAULTS
    p.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="per-layer optimizer")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """--backend, --device, --threads, --no-progress: where and how a command runs."""
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="FF backend; auto: the fastest one that runs on --device")
    p.add_argument("--device", default=default_device(), help="torch device")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none either when stderr is not a terminal)")


def add_precision_option(p: argparse.ArgumentParser, help_text: "str | None" = None) -> None:
    """--precision: fp32, or bf16 = the training loop under torch.autocast(dtype=torch.bfloat16), with fp32 master
    weights and optimizer state (precision.py; docs/design.md, "Mixed precision")."""
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help=help_text or "fp32, or bf16: train under torch.autocast(dtype=torch.bfloat16): bf16 GEMMs "
                                     "with fp32 accumulation, fp32 weights, optimizer state and epilogue (needs a "
                                     "backend with bf16 GEMMs: cpu or reference)")
