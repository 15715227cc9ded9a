"""The real Fashion-MNIST files (Debian's dataset-fashion-mnist, 60,000 / 10,000): the loader on them, and a short
real training run that must clear a bar no untrained net reaches.

Without the package these tests skip with the reason; with FFKERNELS_EXPECT_DATA=fashion-mnist (CI, which installs
it) a missing package fails them instead."""
import os

import pytest
import torch

from ffkernels.data import load_dataset, locate, subsample, validation_split
from ffkernels.net import FFNet
from ffkernels.training import accuracy, train_ff_epoch

FOUND, WHERE = locate("fashion-mnist")


@pytest.fixture(scope="module")
def fmnist():
    if not FOUND:
        if "fashion-mnist" in os.environ.get("FFKERNELS_EXPECT_DATA", "").split(","):
            pytest.fail(f"FFKERNELS_EXPECT_DATA names fashion-mnist, but {WHERE}")
        pytest.skip(f"the real Fashion-MNIST files are not here ({WHERE})")
    return load_dataset("fashion-mnist")


def test_the_official_split(fmnist):
    ds = fmnist
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10 and ds.eval_split == "test"
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    for x in (ds.x_train, ds.x_test):  # uint8 * float32(1/255): the whole range, every value k/255
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert torch.equal(torch.round(x * 255) * torch.tensor(1 / 255, dtype=torch.float32), x)
    # the files as published: the first training image is an ankle boot (9), the first test image too
    assert int(ds.y_train[0]) == 9 and int(ds.y_test[0]) == 9
    again = load_dataset("fashion-mnist")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_validation_split_of_the_real_files(fmnist):
    v = validation_split(fmnist, 10000)
    assert (len(v.y_train), len(v.y_test)) == (50000, 10000) and v.eval_split == "validation"
    counts = torch.bincount(v.y_test, minlength=10)
    assert int(counts.min()) > 900 and int(counts.max()) < 1100  # a uniform draw, not one class cut off


def test_a_short_real_run_learns_what_an_untrained_net_cannot(fmnist):
    """784-256-256 with the head, one epoch on 10,000 training images (hard negatives, +-1 px jitter).

    Measured on the 2-core dev machine (seeds 0 / 1): untrained 10.0 / 10.0% by the head (it starts at zero:
    every prediction is class 0) and 6.7 / 13.8% by goodness; trained 57.0 / 60.2% by the head. The bar, 45%,
    is far above any untrained number and well under the trained ones."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = subsample(fmnist, 10000, None)
    torch.manual_seed(0)
    net = FFNet([784, 256, 256], head=True, num_classes=10)
    untrained = [accuracy(net, ds.x_test, ds.y_test, 10, method=m) for m in ("head", "goodness")]
    assert max(untrained) < 0.2
    train_ff_epoch(net, ds.x_train, ds.y_train, 10, 100, torch.Generator().manual_seed(0), negatives="hard",
                   jitter=1, image_shape=ds.image_shape)
    assert accuracy(net, ds.x_test, ds.y_test, 10) > 0.45
