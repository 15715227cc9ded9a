"""``ffkernels train --model cnn`` and ``--loss competitive`` (docs/design.md, "FF CNNs"): a short real run of each,
FF and BP, its JSON, resume, and the one-line errors of nets that cannot be built."""
import argparse
import json

import pytest
import torch

from ffkernels import train_cli
from ffkernels.backends import available_backends
from ffkernels.cnn import BPCNN, build_competitive_net
from ffkernels.data import load_dataset

from test_cli_errors import assert_one_line_error

CNN = ["--dataset", "digits", "--model", "cnn", "--channels", "10", "20", "--pool-after", "0", "--threads", "1",
       "--lr", "3e-3", "--temperature", "0.3",
       "--no-progress", "--batch-size", "32"]


def test_a_short_cnn_run_learns_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    res = train_cli.main(CNN + ["--epochs", "4", "--json", str(out), "--save", str(tmp_path / "net.pt")])
    del res
    text = capsys.readouterr().out
    assert "cnn 1x8x8-c10-pool-bn-c20-bn (k3)" in text
    data = json.loads(out.read_text())
    assert data["model"] == "cnn" and data["channels"] == [10, 20] and data["loss"] == "competitive"
    assert data["conv_block"] == "bn" and data["norm"] == "none"
    assert data["backend"] == ("cpu" if "cpu" in available_backends() else "reference")
    # digits, 1,437 training images, 4 epochs: far above chance (10%); measured 73%
    assert data["test_accuracy"] > 0.5, data["test_accuracy"]
    state = torch.load(tmp_path / "net.pt")
    assert state["layers.0.weight"].shape == (10, 1, 3, 3) and state["layers.1.weight"].shape == (20, 10, 3, 3)
    assert state["layers.1.running_var"].shape == (20,) and int(state["layers.1.num_batches_tracked"]) > 0


def test_conv_block_plain_is_ffconv2d_with_pooling_between():
    ds = load_dataset("digits")
    net = build_competitive_net(_parse(CNN + ["--conv-block", "plain", "--norm", "rms"]), ds)
    assert [type(m).__name__ for m in net.layers] == ["FFConv2d", "FFConv2d"]
    assert [type(m).__name__ for b in net.between for m in b] == ["MaxPool2d"]
    assert net.layers[0].config.norm == "rms"
    bn = build_competitive_net(_parse(CNN), ds)
    assert [(type(m).__name__, m.pool) for m in bn.layers] == [("FFConvBlock2d", 2), ("FFConvBlock2d", 1)]
    assert [len(b) for b in bn.between] == [0, 0] and bn.layers[0].config.norm == "none"
    twin = BPCNN(ds.image_shape, [10, 20], 3, [0], 10, norm="none", conv_block="bn")
    assert [type(m).__name__ for m in twin.bns] == ["BatchNorm2d", "BatchNorm2d"]


def _parse(argv):
    p = argparse.ArgumentParser()
    train_cli.add_arguments(p)
    p.set_defaults(**train_cli.preset_defaults(argv))
    return p.parse_args(argv)


def test_cnn_resume_continues_the_run(tmp_path, capsys):
    train_cli.main(CNN + ["--epochs", "1", "--save", str(tmp_path / "a.pt"), "--lr-schedule", "constant"])
    train_cli.main(CNN + ["--epochs", "1", "--resume", str(tmp_path / "a.pt"), "--save", str(tmp_path / "b.pt"),
                          "--lr-schedule", "constant"])
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert not torch.equal(a["layers.0.weight"], b["layers.0.weight"])
    assert b["layers.0._extra_state"]["step"] == 2 * a["layers.0._extra_state"]["step"]
    capsys.readouterr()


def test_the_bp_twin_and_the_competitive_mlp_run(capsys):
    bp = train_cli.main(CNN + ["--epochs", "1", "--algo", "bp"])
    assert bp["algo"] == "bp" and bp["model"] == "cnn" and bp["test_accuracy"] > 0.3
    mlp = train_cli.main(["--dataset", "digits", "--loss", "competitive", "--hidden", "40", "40", "--goodness", "mean",
                          "--epochs", "4", "--threads", "1", "--no-progress", "--lr", "3e-3", "--batch-size", "32"])
    assert mlp["loss"] == "competitive" and mlp["test_accuracy"] > 0.5  # measured 84%
    capsys.readouterr()


@pytest.mark.parametrize("extra,needle", [
    (["--pool-after", "0", "1", "2", "3", "--channels", "10", "10", "10", "10"], "below 1x1"),
    (["--channels", "15"], "multiples of the 10 classes"),
    (["--loss", "hinton"], "--loss competitive"),
    (["--kernel-size", "4"], "--kernel-size must be odd"),
    (["--pool-after", "5"], "--pool-after names conv layers"),
    (["--head"], "--head is not supported with --loss competitive"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--distributed", "data"], "not supported with --distributed"),
])
def test_a_cnn_that_cannot_be_built_is_one_line(extra, needle, capsys):
    assert_one_line_error(["train"] + CNN + ["--epochs", "0"] + extra, capsys, needle)


def test_results_into_a_missing_folder_are_refused_before_training(tmp_path, capsys):
    for flag in ("--json", "--save"):
        assert_one_line_error(["train", "--epochs", "1", flag, str(tmp_path / "no" / "run.json")], capsys,
                              f"{flag} ", "does not exist")


def test_competitive_mlp_widths_must_split_into_the_classes(capsys):
    assert_one_line_error(["train", "--dataset", "digits", "--loss", "competitive", "--hidden", "25", "--epochs", "0"],
                          capsys, "not a multiple of 10")


def test_help_shows_the_cnn_options_and_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--model {mlp,cnn}", "--channels", "(default: 40 80 160 320)", "--pool-after", "--temperature",
                   "--model cnn's defaults: --loss competitive, --conv-block bn, --norm none", "--conv-block {bn,plain}"):
        assert needle in text, needle
