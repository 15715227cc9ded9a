"""MNIST-format datasets (MNIST, Fashion-MNIST): the IDX files read with numpy, plain or gzipped where they are,
and where they are looked for.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one big-endian uint32 per
dimension, then the values in C order. ``read_idx`` checks all of it and raises :class:`DatasetFormatError`
naming the file for anything else (bad gzip stream, truncated data, trailing bytes, wrong magic); nothing is
written anywhere, so there is no cache that a half-finished read could leave behind.

Where a dataset is looked for (``idx_folders``), in this order, the first folder holding all four files wins:
    with ``data_root``:   <root>/<TorchvisionFolder>/raw, then <root> itself (the flat layout)
    without it:          the same under default_data_root(), then the system folders (SYSTEM_FOLDERS: the
                         Debian package ``dataset-fashion-mnist`` installs /usr/share/datasets/fashion-mnist)
Each file may be plain or ``.gz`` (the plain one is read when both are there).
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from .dataset import DatasetFormatError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# the folder under a data root that torchvision downloads each dataset into
TORCHVISION_FOLDERS = {"mnist": os.path.join("MNIST", "raw"), "fashion-mnist": os.path.join("FashionMNIST", "raw")}
SYSTEM_FOLDERS = {"mnist": (), "fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}
# the offline route to each, named when nothing is found
SYSTEM_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut stream an EOFError
        raise DatasetFormatError(f"ffkernels: could not read {path!r}: {type(e).__name__}: {e} (truncated or "
                                 "corrupt? delete it and fetch it again)") from e


def read_idx(path: str) -> np.ndarray:
    """The array in the IDX file ``path`` (``.gz``: gzipped); DatasetFormatError naming the file if it is not
    a whole, valid IDX file."""
    data = _read_bytes(path)

    def bad(why: str) -> DatasetFormatError:
        return DatasetFormatError(f"ffkernels: {path!r} is not a valid IDX file: {why}")

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES or data[3] == 0:
        raise bad(f"bad magic {data[:4].hex() or 'none'} (expected 0000<type><ndim>)")
    dtype, ndim = _TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise bad(f"the header needs {header} bytes, the file has {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise bad(f"{what}: {len(data)} bytes where shape {shape} needs {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def idx_folders(name: str, data_root=None, default_root: "str | None" = None) -> list:
    """The folders looked in for dataset ``name``, in order (see the module docstring)."""
    if data_root is not None:
        root = os.path.expanduser(os.fspath(data_root))
        return [os.path.join(root, TORCHVISION_FOLDERS[name]), root]
    return [os.path.join(default_root, TORCHVISION_FOLDERS[name]), default_root, *SYSTEM_FOLDERS[name]]


def idx_paths(folder: str) -> "list | None":
    """The four files in ``folder`` (each plain or ``.gz``), or None unless all four are there."""
    paths = []
    for f in IDX_FILES:
        plain = os.path.join(folder, f)
        found = next((p for p in (plain, plain + ".gz") if os.path.isfile(p)), None)
        if found is None:
            return None
        paths.append(found)
    return paths


def find_idx(name: str, data_root=None, default_root: "str | None" = None) -> "tuple[str, list] | None":
    """(folder, its four files) where dataset ``name`` is found first, or None."""
    for folder in idx_folders(name, data_root, default_root):
        paths = idx_paths(folder)
        if paths is not None:
            return folder, paths
    return None


def read_split(paths, num_classes: int = 10):
    """((x_train, y_train), (x_test, y_test)) from the four IDX files in IDX_FILES order, x as (n, 1, H, W) uint8;
    DatasetFormatError naming the file whose contents do not fit (rank, count, label range)."""
    out = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        x, y = read_idx(images_path), read_idx(labels_path)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DatasetFormatError(f"ffkernels: {images_path!r} should hold uint8 images (n, H, W), "
                                     f"it holds {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetFormatError(f"ffkernels: {labels_path!r} should hold {len(x)} labels (one per image of "
                                     f"{os.path.basename(images_path)}), it holds shape {y.shape}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DatasetFormatError(f"ffkernels: {labels_path!r} holds labels outside 0..{num_classes - 1}")
        out.append((x[:, None], y.astype(np.int64)))
    return tuple(out)
