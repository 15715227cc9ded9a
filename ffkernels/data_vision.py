"""MNIST and Fashion-MNIST read from their IDX files (``ffkernels.data_idx``, no torchvision needed to read
them); SVHN and CIFAR-10 read by torchvision. ``download=True`` fetches any of them with torchvision.

torchvision is imported only to download, or to read SVHN / CIFAR-10. Where each is looked for:

    MNIST, Fashion-MNIST: <root>/MNIST/raw or <root>/FashionMNIST/raw (torchvision's layout), or <root> itself,
        each of the four IDX files plain or gzipped, read where it is (nothing is unpacked or written); without
        a data_root also the system folders of ``data_idx.SYSTEM_FOLDERS`` (Debian's dataset-fashion-mnist)
    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    <root>/train_32x32.mat, <root>/test_32x32.mat   (SVHN; reading them needs scipy)

``<root>`` is ``data_root``, default :func:`~ffkernels.dataset.default_data_root`. torchvision accepts the
CIFAR-10 and SVHN files only if their MD5 is the official one. A missing dataset raises
:class:`DatasetNotFoundError` naming the files and folders looked for and how to get them; unreadable files a
:class:`DatasetFormatError` naming the file. Each loader returns the official train/test split, inputs float32
in [0, 1] flattened channel-first, and where it was read from (``Dataset.source``).
"""
from __future__ import annotations

import importlib
import os

import numpy as np

from .data_idx import IDX_FILES, SYSTEM_PACKAGES, find_idx, idx_folders, read_split
from .dataset import Dataset, DatasetFormatError, DatasetNotFoundError, default_data_root, from_arrays

MNIST_FILES = IDX_FILES
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
# the datasets torchvision reads: (folder under the data root, files)
ON_DISK = {"cifar10": (CIFAR10_FOLDER, CIFAR10_FILES), "svhn": ("", SVHN_FILES)}


def _require(name: str, *modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            package = module.split(".")[0]
            raise RuntimeError(f"ffkernels: reading the {name!r} dataset needs {package}; "
                               f"pip install {package}") from e


def resolve_root(data_root) -> str:
    return default_data_root() if data_root is None else os.path.expanduser(os.fspath(data_root))


def missing_files(name: str, data_root) -> "tuple[str, list]":
    """(root, the paths of ``ON_DISK[name]``'s files that are not under it) for a dataset torchvision reads."""
    root = resolve_root(data_root)
    folder, files = ON_DISK[name]
    return root, [p for p in (os.path.join(root, folder, f) for f in files) if not os.path.isfile(p)]


def _load(name: str, data_root, download: bool, read, modules=()) -> Dataset:
    """Both official splits, ``read(torchvision.datasets, root, train, download)`` -> ((n, C, H, W) uint8, labels),
    once ``ON_DISK[name]``'s files are under ``<root>/<folder>`` (or have been downloaded there); errors say what
    to do."""
    root, missing = missing_files(name, data_root)
    folder = ON_DISK[name][0]
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
        raise DatasetFormatError(f"ffkernels: torchvision could not read {name!r} from "
                                 f"{os.path.join(root, folder)!r}: {type(e).__name__}: {e} (truncated, corrupt or not "
                                 "the official files? delete them and pass --download to fetch them again)") from e
    return _official_split(name, (x_train, y_train), (x_test, y_test), os.path.join(root, folder))


def _official_split(name: str, train, test, source: str) -> Dataset:
    """The Dataset of the official ((n, C, H, W) uint8 images, labels) splits, inputs scaled to [0, 1]."""
    (x_train, y_train), (x_test, y_test) = train, test
    return from_arrays(name, x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1), y_test,
                       10, x_train.shape[1:], scale=1 / 255.0, source=source)


TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def not_found_message(name: str, data_root=None) -> str:
    """Why dataset ``name`` (an IDX one) was not found, and the ways to get it, in one line."""
    folders = idx_folders(name, data_root, default_data_root())
    routes = []
    if name in SYSTEM_PACKAGES and data_root is None:
        routes.append(f"install it offline with `apt-get install {SYSTEM_PACKAGES[name]}` (then found with no flag)")
    elif name in SYSTEM_PACKAGES:
        routes.append(f"leave out --data-root (data_root) to read the `{SYSTEM_PACKAGES[name]}` package's files")
    routes += ["pass --download (download=True) to fetch it with torchvision",
               "or --data-root (data_root=...) pointing at a folder holding the files"]
    return (f"ffkernels: dataset {name!r} not found under {resolve_root(data_root)!r}: looked in "
            f"{', '.join(map(repr, folders))} for {', '.join(f + '[.gz]' for f in IDX_FILES)}; "
            + "; ".join(routes))


def _download_idx(name: str, root: str) -> None:
    """Fetch dataset ``name`` into ``<root>/<TORCHVISION_FOLDERS[name]>`` with torchvision."""
    _require(name, "torchvision.datasets")
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, TORCHVISION_CLASSES[name])(root, train=train, download=True)
    except Exception as e:  # network errors, checksum mismatches, unwritable folders...
        raise DatasetNotFoundError(f"ffkernels: downloading {name!r} into {root!r} failed: "
                                   f"{type(e).__name__}: {e}") from e


def _load_idx(name: str, data_root, download: bool) -> Dataset:
    found = find_idx(name, data_root, default_data_root())
    if found is None and download:
        root = resolve_root(data_root)
        _download_idx(name, root)
        found = find_idx(name, root)
    if found is None:
        raise DatasetNotFoundError(not_found_message(name, data_root))
    folder, paths = found
    return _official_split(name, *read_split(paths), folder)


def load_mnist(data_root=None, download: bool = False) -> Dataset:
    """MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/MNIST/raw`` or ``<data_root>``."""
    return _load_idx("mnist", data_root, download)


def load_fashion_mnist(data_root=None, download: bool = False) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/FashionMNIST/raw`` or
    ``<data_root>``; without a data_root also from Debian's ``dataset-fashion-mnist`` package."""
    return _load_idx("fashion-mnist", data_root, download)


def _read_cifar10(tvd, root, train, download):
    d = tvd.CIFAR10(root, train=train, download=download)
    return d.data.transpose(0, 3, 1, 2), np.asarray(d.targets)  # torchvision's (N, H, W, C) -> (N, C, H, W)


def load_cifar10(data_root=None, download: bool = False) -> Dataset:
    """CIFAR-10 (50,000 train / 10,000 test, 3x32x32), from ``<data_root>/cifar-10-batches-py``."""
    return _load("cifar10", data_root, download, _read_cifar10)


def _read_svhn(tvd, root, train, download):
    d = tvd.SVHN(root, split="train" if train else "test", download=download)
    return d.data, d.labels  # (N, C, H, W), the digit 0 as label 0 (the .mat files store it as 10)


def load_svhn(data_root=None, download: bool = False) -> Dataset:
    """SVHN cropped digits (73,257 train / 26,032 test, 3x32x32), from ``<data_root>/{train,test}_32x32.mat``."""
    return _load("svhn", data_root, download, _read_svhn, modules=("scipy.io",))
