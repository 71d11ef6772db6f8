"""Data layouts, subsets, the cache, and the errors for bad data roots."""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from ablation.data import DataError, detect_layout, load_images, stratified_indices, subset, to_unit_range
from ablation.synthetic import make_imagefolder


def test_imagefolder_loads_as_uint8(image_folder, tmp_path):
    data = load_images(image_folder, cache_dir=tmp_path / "cache")
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (256, 3, 32, 32)
    assert data.test_x.shape == (128, 3, 32, 32)
    assert data.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert torch.bincount(data.train_y).tolist() == [64] * 4
    assert list((tmp_path / "cache").glob("*.pt")), "decoded images are cached"
    again = load_images(image_folder, cache_dir=tmp_path / "cache")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_archive_of_imagefolder_matches_the_folder(image_folder, tmp_path):
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="fake")
    assert detect_layout(archive) == "archive"
    a = load_images(archive, cache_dir=tmp_path / "cache")
    f = load_images(image_folder, cache_dir=None)
    assert torch.equal(a.train_x, f.train_x) and torch.equal(a.test_x, f.test_x)
    assert torch.equal(a.train_y, f.train_y) and a.classes == f.classes


def _fake_cifar(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(name, k):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": [(i + k) % 10 for i in range(n)]}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", i)
    batch("test_batch", 0)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return d


def test_cifar10_python_batches_in_an_archive(tmp_path):
    d = _fake_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    data = load_images(archive, cache_dir=tmp_path / "cache")
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.classes == [f"c{i}" for i in range(10)]
    assert detect_layout(tmp_path / "src") == "cifar10"


def test_imagefolder_cache_follows_images_inside_class_folders(tmp_path):
    # BMP files of one size are all the same length: a replaced image differs only in its mtime.
    root = make_imagefolder(tmp_path / "d", n_train=8, n_test=4, fmt="bmp")
    cache = tmp_path / "cache"
    target = root / "train" / "class_0" / "0000.bmp"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: a later rewrite surely differs
    first = load_images(root, cache_dir=cache)
    assert first.train_x.shape[0] == 8
    (cached,) = cache.glob("*.pt")
    stamp = cached.stat().st_mtime_ns

    again = load_images(root, cache_dir=cache)  # nothing changed: the cache file is reused, not rewritten
    assert list(cache.glob("*.pt")) == [cached] and cached.stat().st_mtime_ns == stamp
    assert torch.equal(again.train_x, first.train_x)

    shutil.copyfile(root / "train" / "class_0" / "0004.bmp", root / "train" / "class_1" / "0099.bmp")
    added = load_images(root, cache_dir=cache)
    assert added.train_x.shape[0] == first.train_x.shape[0] + 1
    assert torch.bincount(added.train_y).tolist() == [2, 3, 2, 2]

    original = load_images(root, cache_dir=None).train_x[0]  # class_0/0000.bmp sorts first
    size = target.stat().st_size
    shutil.copyfile(root / "train" / "class_2" / "0002.bmp", target)
    assert target.stat().st_size == size
    replaced = load_images(root, cache_dir=cache)
    assert not torch.equal(replaced.train_x[0], original)
    assert torch.equal(replaced.train_x[0], load_images(root, cache_dir=None).train_x[0])

    (root / "train" / "class_1" / "0099.bmp").unlink()
    deleted = load_images(root, cache_dir=cache)
    assert deleted.train_x.shape[0] == 8 and torch.equal(deleted.train_x, load_images(root, cache_dir=None).train_x)
    assert len(list(cache.glob("*.pt"))) == 4  # one cache file per state: first, added, replaced, deleted


def test_cifar10_nested_one_level_down_loads(tmp_path):
    # root/<name>/cifar-10-batches-py, as unpacking an archive into root leaves it.
    d = _fake_cifar(tmp_path / "outer" / "cifar-10-python")
    assert detect_layout(tmp_path / "outer") == "cifar10"
    data = load_images(tmp_path / "outer", download=False, cache_dir=tmp_path / "cache")
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.classes == [f"c{i}" for i in range(10)]
    with open(d / "data_batch_2", "rb") as f:
        batch = pickle.load(f)
    assert torch.equal(data.train_x[20:40].reshape(20, -1), torch.from_numpy(batch["data"]))
    assert data.train_y[20:40].tolist() == batch["labels"]
    for same in (tmp_path / "outer" / "cifar-10-python", d):  # the torchvision root and the batches folder
        other = load_images(same, download=False)
        assert torch.equal(other.train_x, data.train_x) and torch.equal(other.test_y, data.test_y)


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "archive"])
def test_cifar10_missing_batch_file_names_it(tmp_path, packed):
    d = _fake_cifar(tmp_path / "src")
    (d / "data_batch_3").unlink()
    root = tmp_path / "src"
    if packed:
        root = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            tar.add(d, arcname="cifar-10-batches-py")
    with pytest.raises(DataError) as info:
        load_images(root, download=False, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "lacks data_batch_3;" in msg and str(root if packed else d) in msg
    assert "complete CIFAR-10 python folder" in msg
    assert all(name in msg for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"))


def test_stratified_subsets_are_deterministic_and_balanced():
    labels = torch.arange(1000) % 10
    a = stratified_indices(labels, 105, seed=0)
    assert torch.equal(a, stratified_indices(labels, 105, seed=0))
    assert not torch.equal(a, stratified_indices(labels, 105, seed=1))
    counts = torch.bincount(labels[a], minlength=10).tolist()
    assert sum(counts) == 105 and max(counts) - min(counts) <= 1
    assert torch.equal(stratified_indices(labels, None, 0), torch.arange(1000))


def test_subset_sizes(image_folder):
    data = subset(load_images(image_folder, cache_dir=None), 40, 20, seed=0)
    assert len(data.train_x) == 40 and len(data.test_x) == 20
    assert torch.bincount(data.train_y).tolist() == [10] * 4


def test_pixels_scaled_to_tanh_range():
    x = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(to_unit_range(x), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]).view(1, 1, 1, 3))


def test_missing_root_without_download_names_path_and_layouts(tmp_path):
    with pytest.raises(DataError) as info:
        load_images(tmp_path / "nowhere", download=False)
    msg = str(info.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "cifar-10-batches-py" in msg and "train/<class>" in msg and ".tar.gz" in msg


def test_missing_root_when_download_fails_names_path(tmp_path, monkeypatch):
    # A real torchvision download against a closed local port: it fails, and the error says where.
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = tmp_path / "cifar"
    with pytest.raises(DataError) as info:
        load_images(root, download=True)
    assert str(root) in str(info.value) and "downloaded" in str(info.value)


def test_imagefolder_without_test_split(tmp_path):
    root = make_imagefolder(tmp_path / "d", 8, 4)
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="has no test/ folder"):
        load_images(root)


def test_imagefolder_with_different_classes(tmp_path):
    root = make_imagefolder(tmp_path / "d", 8, 4)
    (root / "test" / "class_3").rename(root / "test" / "zebra")
    with pytest.raises(DataError) as info:
        load_images(root, cache_dir=None)
    assert "differ" in str(info.value) and "zebra" in str(info.value) and "class_3" in str(info.value)


def test_not_an_archive(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match="not a .tar.gz"):
        load_images(f)
