"""Every ``ffkernels`` command turns a user error into one line on stderr and exit status 2 (no traceback), leaves
nothing behind, and prints plain lines (no progress bars) when stderr is not a terminal. Unexpected errors keep
their traceback."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffkernels import cli
from ffkernels.backends import available_backends

from test_data import write_idx, write_mnist


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``ffkernels ARGV`` run in this process."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_one_line_error(argv, capsys, *needles):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"ffkernels {argv[0]}"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


TINY = ["--hidden", "8", "--epochs", "1", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--hidden", "-5"], "--hidden: must be >= 1, got -5"),
    (["train", "--epochs", "two"], "--epochs: 'two' is not an integer"),
    (["train", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["train", "--lr", "-1", "--epochs", "0"], "lr must be a finite number >= 0"),
    (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "--head-layers", "7", "--epochs", "0"], "head_layers"),
    (["train", "--validation", "4000", "--epochs", "0"], "--validation: "),
    (["train", "--jitter", "-1", "--epochs", "0"], "--jitter must be >= 0"),
    (["study", "--seeds", "0"], "--seeds must be >= 1"),
    (["study", "--pretext", "colour"], "unknown pretext task colour"),
    (["demo", "--epochs", "0"], "--epochs: must be >= 1"),
    (["bench", "--width", "0"], "expected a positive integer"),
    (["bench", "--dtype", "int8"], "expected comma-separated dtypes"),
    (["data", "--bogus"], "unrecognized arguments: --bogus"),
    (["info", "--threads", "2"], "unrecognized arguments"),
])
def test_bad_option_values_are_one_line_and_exit_2(argv, needle, capsys):
    assert_one_line_error(argv, capsys, needle)


def test_missing_and_corrupt_datasets(tmp_path, capsys):
    root = str(tmp_path / "data")
    assert_one_line_error(["train", "--dataset", "mnist", "--data-root", root, *TINY], capsys,
                          "dataset 'mnist' not found", "--download")
    write_mnist(root)
    write_idx(os.path.join(root, "MNIST", "raw", "t10k-labels-idx1-ubyte"), np.full(4, 12))
    assert_one_line_error(["train", "--dataset", "mnist", "--data-root", root, *TINY], capsys,
                          "t10k-labels-idx1-ubyte' holds labels outside 0..9")


def test_a_study_that_fails_on_its_input_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "study"
    assert_one_line_error(["study", "--dataset", "cifar10", "--data-root", str(tmp_path / "none"), "--out", str(out),
                           "--hidden", "8", "--epochs", "1", "--no-progress"], capsys, "'cifar10' not found")
    assert not out.exists()  # no results.json with this config to refuse the corrected rerun
    assert_one_line_error(["study", "--dataset", "digits", "cifar10", "--data-root", str(tmp_path / "none"),
                           "--out", str(out), "--hidden", "8", "--epochs", "1", "--no-progress"], capsys,
                          "'cifar10' not found")
    assert not out.exists()  # the second dataset is checked before the first is trained


def test_unreadable_and_unfitting_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "net.pt"
    argv = ["train", "--dataset", "digits", *TINY]
    assert_one_line_error([*argv, "--resume", str(ckpt)], capsys, f"cannot read checkpoint '{ckpt}'")
    for garbage in (b"not a checkpoint", b"not a torch file"):  # the second: torch's error spans several lines
        ckpt.write_bytes(garbage)
        assert_one_line_error([*argv, "--resume", str(ckpt)], capsys, f"cannot read checkpoint '{ckpt}'")
    code, _, _ = run_cli([*argv, "--epochs", "0", "--save", str(ckpt)], capsys)
    assert code == 0 and ckpt.is_file()
    other = ["train", "--dataset", "digits", "--hidden", "9", "--epochs", "0", "--threads", "1"]
    assert_one_line_error([*other, "--resume", str(ckpt)], capsys, "does not fit this net")


@pytest.mark.skipif("cuda" in available_backends(), reason="the cuda backend runs here")
def test_unavailable_backend(capsys):
    assert_one_line_error(["train", "--dataset", "digits", "--backend", "cuda", "--device", "cpu", *TINY], capsys,
                          "cuda")


def test_data_lists_every_dataset(tmp_path, capsys):
    write_mnist(str(tmp_path))
    code, out, _ = run_cli(["data", "--data-root", str(tmp_path)], capsys)
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert code == 0 and set(lines) == {"mnist5k", "digits", "mnist", "fashion-mnist", "svhn", "cifar10"}
    assert lines["mnist"].split() == ["available", str(tmp_path / "MNIST" / "raw")]
    assert lines["cifar10"].startswith("missing") and lines["mnist5k"].startswith("available")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    import ffkernels.data_cli

    def broken(args):
        raise RuntimeError("a defect, not a user error")

    monkeypatch.setattr(ffkernels.data_cli, "run", broken)
    with pytest.raises(RuntimeError, match="a defect"):
        cli.main(["data"])


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "ffkernels", "train", "--dataset", "digits", "--hidden", "16",
                        "--epochs", "2", "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr and "it/s" not in r.stderr, r.stderr[:500]
    epochs = [line for line in r.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all("test acc" in line for line in epochs)
    torch.testing.assert_close(float(r.stdout.split("test accuracy ")[1].split("%")[0]) / 100,
                               float(epochs[-1].split("test acc ")[1].rstrip("%")) / 100)
