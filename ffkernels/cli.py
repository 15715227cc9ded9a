"""The ``ffkernels`` command: ``ffkernels {train,study,demo,bench,data,info} ...`` (``ffkernels CMD -h`` for help).

A user error (a bad option value, a missing or corrupt dataset, an unreadable checkpoint, an unavailable backend)
is one line on stderr and exit status 2, no traceback; an unexpected error still shows its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ._types import BackendUnavailableError
from .cli_options import HelpFormatter
from .dataset import DatasetFormatError, DatasetNotFoundError

# subcommand -> (module with add_arguments(parser) and run(args), one-line help); a module may also have
# preset_defaults(argv) -> {dest: value}: defaults that replace add_arguments' ones (explicit flags still win)
COMMANDS = {
    "train": ("ffkernels.train_cli", "supervised FF training of an FFNet on an offline dataset"),
    "study": ("ffkernels.study.cli", "FF vs BP self-supervised study: pretext training, linear-probe transfer"),
    "demo": ("ffkernels.study.demo", "a short FF-vs-BP study on the embedded MNIST subset"),
    "bench": ("ffkernels.bench.cli", "FF throughput and memory vs BP, against the GEMM floor"),
    "data": ("ffkernels.data_cli", "which datasets can be loaded here and where each was found"),
    "info": ("ffkernels.info", "how ffkernels was built and which backends can run here"),
}


# errors that are the user's input, not a defect: one line and exit 2 (commands also raise SystemExit("...") for
# their own checks, which gets the same treatment)
USER_ERRORS = (DatasetNotFoundError, DatasetFormatError, BackendUnavailableError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad option is one line (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class UserErrorExit(SystemExit):
    """Exit status 2 after a user error; ``str()`` is the line printed (for callers of ``main`` and tests)."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(command: str, message: str) -> None:
    """Print ``ffkernels COMMAND: message`` (its first line, without a repeated prefix) to stderr; exit 2."""
    text = (str(message).strip().splitlines() or ["failed"])[0]
    for prefix in (f"ffkernels {command}: ", "ffkernels: "):
        text = text.removeprefix(prefix)
    line = f"ffkernels {command}: {text}"
    print(line, file=sys.stderr, flush=True)
    raise UserErrorExit(line) from None


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(prog="ffkernels", description="Fused Forward-Forward kernels and study harness.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules, subparsers = {}, {}
    for name, (modname, help_) in COMMANDS.items():
        sp = subparsers[name] = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if argv[:1] == [name]:  # import only the module of the command being run
            modules[name] = importlib.import_module(modname)
            modules[name].add_arguments(sp)
            if hasattr(modules[name], "preset_defaults"):
                sp.set_defaults(**modules[name].preset_defaults(argv[1:]))
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    if extra:  # named by the command's own parser ("ffkernels train: error: ..."), not the top one
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.command_line = ["ffkernels", *argv]  # recorded by commands that write results (train's --json)
    try:
        modules[args.command].run(args)
    except UserErrorExit:
        raise
    except SystemExit as e:
        if isinstance(e.code, str):  # a command's own check: SystemExit("ffkernels CMD: what is wrong")
            fail(args.command, e.code)
        raise
    except USER_ERRORS as e:
        fail(args.command, str(e))


if __name__ == "__main__":
    main()
