"""The commands' options come from the library (config.py, the backend registry), -h shows the defaults, and the
command modules import each other without cycles."""
import argparse
import ast
import pathlib

import pytest

import ffkernels
from ffkernels.backends import BACKEND_NAMES
from ffkernels.cli_options import HelpFormatter
from ffkernels.config import GOODNESS, LOSSES, NORMS, OPTIMIZERS, FFConfig
from ffkernels.study.config import StudyConfig

PACKAGE = pathlib.Path(ffkernels.__file__).parent
COMMAND_MODULES = ["ffkernels.cli", "ffkernels.cli_options", "ffkernels.train_cli", "ffkernels.train_common",
                   "ffkernels.training", "ffkernels.distributed.cli", "ffkernels.study.cli", "ffkernels.study.demo",
                   "ffkernels.bench.cli", "ffkernels.info"]


def _parser(command: str) -> argparse.ArgumentParser:
    import importlib

    from ffkernels.cli import COMMANDS

    p = argparse.ArgumentParser(prog=f"ffkernels {command}", formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    return p


def _options(p: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in p._actions}


@pytest.mark.parametrize("command", ["train", "study"])
def test_ff_option_choices_and_defaults_come_from_config(command):
    opts, d = _options(_parser(command)), FFConfig()
    from ffkernels.study.cli import STUDY_LOSSES

    assert STUDY_LOSSES == tuple(x for x in LOSSES if x != "scff")  # the study's --loss: all but scff (its pretext)
    losses = STUDY_LOSSES if command == "study" else LOSSES
    for dest, choices in (("goodness", GOODNESS), ("loss", losses), ("norm", NORMS), ("optimizer", OPTIMIZERS)):
        if dest in opts:
            assert tuple(opts[dest].choices) == choices and opts[dest].default == getattr(d, dest), dest
    assert tuple(opts["backend"].choices) == ("auto", *BACKEND_NAMES) and opts["backend"].default == "auto"
    assert opts["lr"].default == d.lr and opts["threshold"].default is None


def test_study_defaults_are_the_ff_layer_defaults():
    s, d = StudyConfig(), FFConfig()
    assert (s.goodness, s.loss, s.norm, s.ff_lr) == (d.goodness, d.loss, d.norm, d.lr)


@pytest.mark.parametrize("command", ["train", "study", "demo", "bench"])
def test_help_shows_every_default(command):
    p = _parser(command)
    fmt = p._get_formatter()
    for a in p._actions:
        if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS):
            assert "default" in fmt._get_help_string(a), a.option_strings
    text = p.format_help()
    if command == "train":
        d = FFConfig()
        for shown in (f"(default: {d.optimizer})", f"(default: {d.lr})", f"(default: {d.loss})",
                      "(default: 1000 1000 1000)"):
            assert shown in " ".join(text.split()), shown


def _imports(path: pathlib.Path, module: str, is_package: bool, known: set) -> set:
    """ffkernels modules ``module`` imports anywhere in its file (inside functions too; relative ones resolved)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            names = [src] + [f"{src}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_cycle_through_the_command_modules():
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ["ffkernels", *f.relative_to(PACKAGE).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    graph = {m: _imports(f, m, pkg, set(files)) for m, (f, pkg) in files.items()}
    for start in COMMAND_MODULES:
        path, todo, seen = {start: None}, [start], {start}
        while todo:  # depth-first from start; a path back to start is a cycle
            m = todo.pop()
            for n in graph[m]:
                assert n != start, f"import cycle: {' -> '.join(_walk_back(path, m)[::-1] + [start])}"
                if n not in seen:
                    seen.add(n)
                    path[n] = m
                    todo.append(n)


def _walk_back(path: dict, m: str) -> list:
    out = []
    while m is not None:
        out.append(m)
        m = path[m]
    return out
