"""MNIST, Fashion-MNIST, SVHN and CIFAR-10 from their files on disk, in torchvision's folder layout.

The files are read here with numpy (MNIST idx, raw or gzipped; CIFAR-10 python pickles; SVHN ``.mat``), so
a folder filled by torchvision, or by hand with the original files, works without torchvision installed.
torchvision is imported only to download (``download=True``), into the same layout:

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/FashionMNIST/raw/  (same file names)
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}
    <root>/{train,test}_32x32.mat                          (SVHN)

Each loader returns the official train/test split, inputs float32 in [0, 1] flattened channel-first.
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

from .dataset import Dataset, DatasetNotFoundError, default_data_root, from_arrays

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_idx(path: str) -> np.ndarray:
    """An array from an IDX file (the MNIST format), raw or gzip-compressed (``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"ffkernels: {path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"ffkernels: {path} is truncated or corrupt: header says shape {shape} "
                         f"({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(folder: str, name: str, gz_ok: bool) -> "str | None":
    for candidate in [name] + ([name + ".gz"] if gz_ok else []):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing(name: str, root: str, wanted: list) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"ffkernels: dataset {name!r} not found under {root!r}: missing {', '.join(wanted)}. "
        f"Pass --download (download=True) to fetch it with torchvision, or --data-root (data_root=...) "
        f"pointing at a folder that holds it in torchvision's layout.")


def _download(name: str, root: str, tv_class: str, splits_kw) -> None:
    """Fetch a dataset with torchvision into ``root``; errors name the dataset and the way out."""
    try:
        import torchvision.datasets as tvd
    except ImportError as e:
        raise DatasetNotFoundError(f"ffkernels: downloading {name!r} needs torchvision (pip install torchvision), "
                                   f"or place its files under {root!r} yourself") from e
    os.makedirs(root, exist_ok=True)
    try:
        for kw in splits_kw:
            getattr(tvd, tv_class)(root, download=True, **kw)
    except Exception as e:  # network errors, checksum mismatches, unwritable folders...
        raise DatasetNotFoundError(f"ffkernels: downloading {name!r} into {root!r} failed: "
                                   f"{type(e).__name__}: {e}") from e


def _to_dataset(name, x_train, y_train, x_test, y_test, image_shape) -> Dataset:
    return from_arrays(name, x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1), y_test,
                       10, image_shape, scale=1 / 255.0)


def _load_idx_pair(name: str, root: str, sub: str, tv_class: str, download: bool) -> Dataset:
    root = default_data_root() if root is None else os.fspath(root)
    folder = os.path.join(root, sub, "raw")

    def locate():
        found = {f: _find(folder, f, gz_ok=True) for pair in MNIST_FILES.values() for f in pair}
        return found, [os.path.join(folder, f) + "[.gz]" for f, p in found.items() if p is None]

    found, missing = locate()
    if missing and download:
        _download(name, root, tv_class, [{"train": True}])  # fetches both splits
        found, missing = locate()
    if missing:
        raise _missing(name, root, missing)
    arrays = {}
    for split, (images, labels) in MNIST_FILES.items():
        x, y = read_idx(found[images]), read_idx(found[labels])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"ffkernels: {name} {split} files disagree: images {x.shape}, labels {y.shape}")
        arrays[split] = (x, y)
    h, w = arrays["train"][0].shape[1:]
    return _to_dataset(name, *arrays["train"], *arrays["test"], (1, h, w))


def load_mnist(data_root=None, download: bool = False) -> Dataset:
    """MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/MNIST/raw``."""
    return _load_idx_pair("mnist", data_root, "MNIST", "MNIST", download)


def load_fashion_mnist(data_root=None, download: bool = False) -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grey), from ``<data_root>/FashionMNIST/raw``."""
    return _load_idx_pair("fashion-mnist", data_root, "FashionMNIST", "FashionMNIST", download)


def _read_cifar_batch(path: str):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise ValueError(f"ffkernels: {path} is not a CIFAR-10 python batch (needs 'data' and 'labels')")
    x = np.asarray(entry["data"], dtype=np.uint8)
    y = np.asarray(entry["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise ValueError(f"ffkernels: {path}: expected data (n, 3072) and n labels, got {x.shape} and {y.shape}")
    return x, y


def load_cifar10(data_root=None, download: bool = False) -> Dataset:
    """CIFAR-10 (50,000 train / 10,000 test, 3x32x32), from ``<data_root>/cifar-10-batches-py``."""
    root = default_data_root() if data_root is None else os.fspath(data_root)
    folder = os.path.join(root, CIFAR10_FOLDER)

    def missing():
        paths = [os.path.join(folder, f) for f in CIFAR10_TRAIN + CIFAR10_TEST]
        return [p for p in paths if not os.path.isfile(p)]

    if missing() and download:
        _download("cifar10", root, "CIFAR10", [{"train": True}])  # one archive holds both splits
    if missing():
        raise _missing("cifar10", root, missing())
    train = [_read_cifar_batch(os.path.join(folder, f)) for f in CIFAR10_TRAIN]
    x_test, y_test = _read_cifar_batch(os.path.join(folder, CIFAR10_TEST[0]))
    return _to_dataset("cifar10", np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                       x_test, y_test, (3, 32, 32))


def _read_svhn(path: str):
    from scipy.io import loadmat

    mat = loadmat(path)
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"ffkernels: {path} is not an SVHN .mat file (needs 'X' and 'y')")
    x = np.transpose(mat["X"], (3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    if len(x) != len(y) or x.shape[1:] != (3, 32, 32):
        raise ValueError(f"ffkernels: {path}: expected X (32, 32, 3, n) and n labels, got {mat['X'].shape} and "
                         f"{mat['y'].shape}")
    return x, y


def load_svhn(data_root=None, download: bool = False) -> Dataset:
    """SVHN cropped digits (73,257 train / 26,032 test, 3x32x32), from ``<data_root>/{train,test}_32x32.mat``."""
    root = default_data_root() if data_root is None else os.fspath(data_root)

    def missing():
        return [os.path.join(root, f) for f in SVHN_FILES.values() if not os.path.isfile(os.path.join(root, f))]

    if missing() and download:
        _download("svhn", root, "SVHN", [{"split": "train"}, {"split": "test"}])
    if missing():
        raise _missing("svhn", root, missing())
    return _to_dataset("svhn", *_read_svhn(os.path.join(root, SVHN_FILES["train"])),
                       *_read_svhn(os.path.join(root, SVHN_FILES["test"])), (3, 32, 32))
