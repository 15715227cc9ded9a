"""The ``ffkernels`` command: ``ffkernels {train,study,demo,bench,info} ...`` (``ffkernels CMD -h`` for help)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli_options import HelpFormatter

# subcommand -> (module with add_arguments(parser) and run(args), one-line help); a module may also have
# preset_defaults(argv) -> {dest: value}: defaults that replace add_arguments' ones (explicit flags still win)
COMMANDS = {
    "train": ("ffkernels.train_cli", "supervised FF training of an FFNet on an offline dataset"),
    "study": ("ffkernels.study.cli", "FF vs BP self-supervised study: pretext training, linear-probe transfer"),
    "demo": ("ffkernels.study.demo", "a short FF-vs-BP study on the embedded MNIST subset"),
    "bench": ("ffkernels.bench.cli", "FF throughput and memory vs BP, against the GEMM floor"),
    "info": ("ffkernels.info", "how ffkernels was built and which backends can run here"),
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="ffkernels", description="Fused Forward-Forward kernels and study harness.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (modname, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if argv[:1] == [name]:  # import only the module of the command being run
            modules[name] = importlib.import_module(modname)
            modules[name].add_arguments(sp)
            if hasattr(modules[name], "preset_defaults"):
                sp.set_defaults(**modules[name].preset_defaults(argv[1:]))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    modules[args.command].run(args)


if __name__ == "__main__":
    main()
