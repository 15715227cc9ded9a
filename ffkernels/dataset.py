"""The :class:`Dataset` every loader returns, the error for one missing on disk, and where on-disk ones live.

Shared by ``ffkernels.data`` (the registry and the offline datasets) and ``ffkernels.data_vision`` (the ones
read by torchvision); it imports neither, so they do not import each other in a cycle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not on disk and were not (or could not be) downloaded."""


class DatasetFormatError(ValueError):
    """A dataset's files are there but cannot be read: truncated, corrupt or not the expected format."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor   # (n_train, features) float32 in [0, 1]
    y_train: torch.Tensor   # (n_train,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple      # (channels, height, width) of one input
    source: str = ""        # where it was read from (a folder, a package), for logs and ``ffkernels data``
    eval_split: str = "test"  # what x_test/y_test hold: "test", or "validation" (data.validation_split)

    @property
    def in_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, {self.eval_split}={len(self.y_test)}, "
                f"features={self.in_features}, classes={self.num_classes}, image={self.image_shape})")


def from_arrays(name, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                num_classes: int, image_shape, scale: float = 1.0, source: str = "") -> Dataset:
    """A Dataset from given train/test arrays (e.g. an official split), inputs multiplied by ``scale``."""
    def inputs(x):  # always a new float32 array: the caller's arrays are never modified
        return torch.from_numpy(np.ascontiguousarray(np.multiply(x, np.float32(scale), dtype=np.float32)))

    def labels(y):
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    return Dataset(name, inputs(x_train), labels(y_train), inputs(x_test), labels(y_test), num_classes,
                   tuple(image_shape), source)


def default_data_root() -> str:
    """Where on-disk datasets live when no data_root is given: $FFKERNELS_DATA, else ~/.cache/ffkernels/data."""
    return os.environ.get("FFKERNELS_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "ffkernels", "data")
