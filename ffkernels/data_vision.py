"""MNIST, Fashion-MNIST, SVHN and CIFAR-10, read (and with ``download=True`` fetched) by torchvision.

torchvision is imported only when one of them is loaded. Each loader looks under ``data_root`` (default:
:func:`~ffkernels.dataset.default_data_root`) for the files torchvision reads, in its layout:

    <root>/MNIST/raw/{train,t10k}-images-idx3-ubyte, {train,t10k}-labels-idx1-ubyte
    <root>/FashionMNIST/raw/   (the same four file names)
    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    <root>/train_32x32.mat, <root>/test_32x32.mat   (SVHN; reading them needs scipy)

An MNIST file present only gzipped (``<name>.gz``, as published) is unpacked next to it first, as torchvision's
own download does. torchvision accepts the CIFAR-10 and SVHN files only if their MD5 is the official one.
A missing file raises :class:`DatasetNotFoundError` naming it. Each loader returns the official train/test
split, inputs float32 in [0, 1] flattened channel-first.
"""
from __future__ import annotations

import gzip
import importlib
import os
import shutil

import numpy as np

from .dataset import Dataset, DatasetNotFoundError, default_data_root, from_arrays

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _require(name: str, *modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            package = module.split(".")[0]
            raise RuntimeError(f"ffkernels: reading the {name!r} dataset needs {package}; "
                               f"pip install {package}") from e


def _unpack_gz(paths) -> None:
    """``<path>.gz`` unpacked to ``<path>`` wherever only the compressed file is there."""
    for path in paths:
        if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            try:
                with gzip.open(path + ".gz", "rb") as src, open(path + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as e:
                raise ValueError(f"ffkernels: could not unpack {path + '.gz'!r}: {type(e).__name__}: {e}") from e
            os.replace(path + ".part", path)  # never a half-written file under the name torchvision reads


def _load(name: str, data_root, download: bool, folder: str, files, read, modules=(), gz=False) -> Dataset:
    """Both official splits, ``read(torchvision.datasets, root, train, download)`` -> ((n, C, H, W) uint8, labels),
    once ``files`` are under ``<root>/<folder>`` (or have been downloaded there); errors say what to do."""
    root = default_data_root() if data_root is None else os.path.expanduser(os.fspath(data_root))
    paths = [os.path.join(root, folder, f) for f in files]
    if gz:
        _unpack_gz(paths)
    missing = [p + ("[.gz]" if gz else "") for p in paths if not os.path.isfile(p)]
    if missing and not download:
        raise DatasetNotFoundError(
            f"ffkernels: dataset {name!r} not found under {root!r}: missing {', '.join(missing)}. "
            f"Pass --download (download=True) to fetch it with torchvision, or --data-root (data_root=...) "
            f"pointing at a folder that holds it in torchvision's layout.")
    _require(name, "torchvision.datasets", *modules)
    import torchvision.datasets as tvd

    try:
        (x_train, y_train), (x_test, y_test) = (read(tvd, root, train, bool(missing)) for train in (True, False))
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError(f"images and labels disagree: {len(x_train)}/{len(y_train)} train, "
                             f"{len(x_test)}/{len(y_test)} test")
    except Exception as e:  # network errors, checksum mismatches, truncated files, unwritable folders...
        if missing:
            raise DatasetNotFoundError(f"ffkernels: downloading {name!r} into {root!r} failed: "
                                       f"{type(e).__name__}: {e}") from e
        raise ValueError(f"ffkernels: torchvision could not read {name!r} from {os.path.join(root, folder)!r}: "
                         f"{type(e).__name__}: {e} (truncated, corrupt or not the official files? delete them "
                         f"and pass --download to fetch them again)") from e
    return from_arrays(name, x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1), y_test,
                       10, x_train.shape[1:], scale=1 / 255.0)


def _read_mnist(tv_class: str):
    def read(tvd, root, train, download):
        d = getattr(tvd, tv_class)(root, train=train, download=download)
        return d.data.numpy()[:, None], d.targets.numpy()  # one grey channel
    return read


def load_mnist(data_root=None, download: bool = False) -> Dataset:
    """MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/MNIST/raw``."""
    return _load("mnist", data_root, download, os.path.join("MNIST", "raw"), MNIST_FILES, _read_mnist("MNIST"),
                 gz=True)


def load_fashion_mnist(data_root=None, download: bool = False) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/FashionMNIST/raw``."""
    return _load("fashion-mnist", data_root, download, os.path.join("FashionMNIST", "raw"), MNIST_FILES,
                 _read_mnist("FashionMNIST"), gz=True)


def _read_cifar10(tvd, root, train, download):
    d = tvd.CIFAR10(root, train=train, download=download)
    return d.data.transpose(0, 3, 1, 2), np.asarray(d.targets)  # torchvision's (N, H, W, C) -> (N, C, H, W)


def load_cifar10(data_root=None, download: bool = False) -> Dataset:
    """CIFAR-10 (50,000 train / 10,000 test, 3x32x32), from ``<data_root>/cifar-10-batches-py``."""
    return _load("cifar10", data_root, download, CIFAR10_FOLDER, CIFAR10_FILES, _read_cifar10)


def _read_svhn(tvd, root, train, download):
    d = tvd.SVHN(root, split="train" if train else "test", download=download)
    return d.data, d.labels  # (N, C, H, W), the digit 0 as label 0 (the .mat files store it as 10)


def load_svhn(data_root=None, download: bool = False) -> Dataset:
    """SVHN cropped digits (73,257 train / 26,032 test, 3x32x32), from ``<data_root>/{train,test}_32x32.mat``."""
    return _load("svhn", data_root, download, "", SVHN_FILES, _read_svhn, modules=("scipy.io",))
