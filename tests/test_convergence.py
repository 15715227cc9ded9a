"""FF actually learns: a short supervised run on real digits beats a stated accuracy."""
import json

import torch

from ffkernels import FFNet
from ffkernels.data import load_digits
from ffkernels.train_cli import main as train_main
from ffkernels.training import accuracy, train_ff_epoch


def test_ff_learns_digits():
    torch.manual_seed(0)
    ds = load_digits()
    net = FFNet([ds.in_features, 256, 256, 256])  # the defaults: rms norm, sum goodness, threshold = width
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        train_ff_epoch(net, ds.x_train, ds.y_train, ds.num_classes, 50, gen)
    acc = accuracy(net, ds.x_test, ds.y_test, ds.num_classes)
    assert acc >= 0.80, f"FF reached only {acc:.1%} test accuracy on digits after 10 epochs"


def test_train_cli_writes_history_and_resumes(tmp_path):
    ck, js = tmp_path / "net.pt", tmp_path / "h.json"
    args = ["--dataset", "digits", "--hidden", "32", "32", "--epochs", "1", "--batch-size", "50", "--no-progress"]
    train_main(args + ["--save", str(ck), "--json", str(js)])
    h = json.loads(js.read_text())
    assert h["epochs"][0]["test_accuracy"] is not None and h["backend"] in ("cpu", "reference")
    sd = torch.load(ck)
    assert sd["layers.0._extra_state"]["step"] == 29  # ceil(1437 / 50) steps
    train_main(args + ["--resume", str(ck), "--save", str(ck)])
    assert torch.load(ck)["layers.0._extra_state"]["step"] == 58
