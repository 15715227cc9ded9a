"""Datasets: the offline ones, and the on-disk ones read by torchvision (MNIST idx raw/gz, CIFAR-10 pickles,
SVHN .mat) from tiny files written here in torchvision's layout. No network."""
import gzip
import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffkernels import data_vision
from ffkernels.data import LOADERS, DatasetNotFoundError, load_dataset, subsample

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


@pytest.mark.parametrize("name,sub", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets_read_raw_and_gzipped_files(tmp_path, name, sub, gz):
    pytest.importorskip("torchvision")
    arrays = write_mnist(str(tmp_path), sub, gz=gz)
    ds = load_dataset(name, data_root=str(tmp_path))
    assert ds.name == name and ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (4, 784) and ds.x_train.dtype == torch.float32
    np.testing.assert_allclose(ds.x_train.numpy(), arrays["train"][0].reshape(6, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test"][1])  # the official split, in file order


def test_corrupt_idx_files_are_a_clear_error(tmp_path):
    pytest.importorskip("torchvision")
    write_mnist(str(tmp_path))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.truncate(4 + 12 + 5)
    with pytest.raises(ValueError, match=r"torchvision could not read 'mnist' .*truncated, corrupt"):
        load_dataset("mnist", data_root=str(tmp_path))
    path.write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="torchvision could not read 'mnist'"):
        load_dataset("mnist", data_root=str(tmp_path))


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


@pytest.mark.parametrize("name,module", [("mnist", "torchvision.datasets"), ("svhn", "torchvision.datasets"),
                                         ("svhn", "scipy.io")])
def test_missing_reader_package_is_a_clear_error(tmp_path, monkeypatch, name, module):
    for f in data_vision.MNIST_FILES:
        write_idx(str(tmp_path / "MNIST" / "raw" / f), np.zeros(1))
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
    expected = {"mnist": os.path.join("MNIST", "raw", "t10k-labels-idx1-ubyte[.gz]"),
                "fashion-mnist": os.path.join("FashionMNIST", "raw", "train-images-idx3-ubyte[.gz]"),
                "svhn": "test_32x32.mat", "cifar10": os.path.join("cifar-10-batches-py", "batches.meta")}[name]
    assert os.path.join(str(tmp_path), expected) in str(e.value)  # names the files looked for


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


def test_unknown_dataset_and_registry():
    assert set(LOADERS) == {"mnist5k", "digits", "mnist", "fashion-mnist", "svhn", "cifar10"}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_import_does_not_load_torchvision():
    code = ("import sys, ffkernels, ffkernels.study.cli; from ffkernels.data import load_dataset; "
            "load_dataset('digits'); assert 'torchvision' not in sys.modules, 'torchvision imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
