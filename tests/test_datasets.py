from __future__ import annotations

import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image

from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.runtime.errors import UserError


def test_synthetic_is_seeded_and_class_dependent():
    cfg = {"name": "synthetic", "n_train": 64, "n_test": 32}
    _, first = load_dataset(cfg, None)
    _, again = load_dataset(cfg, None)
    assert torch.equal(first.train_images, again.train_images)
    assert first.train_images.dtype == torch.uint8 and first.train_images.shape == (64, 1, 16, 16)
    means = torch.stack([first.train_images[first.train_labels == c].float().mean(0) for c in range(4)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).triu(1).max() > 100


def test_digits_from_scikit_learn():
    _, data = load_dataset({"name": "digits"}, None)
    assert data.train_images.shape[1:] == (1, 8, 8) and len(data.train_labels) + len(data.test_labels) == 1797
    assert data.num_classes == 10 and data.train_images.max() == 255


@needs_fashion_mnist
def test_fashion_mnist_from_debian_files():
    _, data = load_dataset({"name": "fashion_mnist", "max_test": 500}, None)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (500, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert "Sneaker" in data.classes


def write_images(folder, classes, per_class, size=(20, 12)):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, color=(40 * c, 10 * i, 200)).save(folder / name / f"{i}.png")


def test_image_folder_is_split_stratified_and_resized(tmp_path):
    write_images(tmp_path, ["cat", "dog", "owl"], per_class=10)
    _, data = load_dataset({"name": "image_folder", "image_size": 16, "test_fraction": 0.2}, str(tmp_path))
    assert data.classes == ["cat", "dog", "owl"]
    assert data.train_images.shape == (24, 3, 16, 16) and torch.bincount(data.test_labels).tolist() == [2, 2, 2]


def test_image_folder_with_train_and_test_and_grayscale(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], per_class=4)
    write_images(tmp_path / "test", ["a", "b"], per_class=2)
    _, data = load_dataset({"name": "image_folder", "image_size": 8, "channels": 1}, str(tmp_path))
    assert data.train_images.shape == (8, 1, 8, 8) and data.test_images.shape == (4, 1, 8, 8)


def test_image_folder_refuses_one_class_and_unreadable_files(tmp_path):
    write_images(tmp_path / "one", ["only"], per_class=3)
    with pytest.raises(UserError, match="at least 2"):
        load_dataset({"name": "image_folder"}, str(tmp_path / "one"))
    write_images(tmp_path / "broken", ["a", "b"], per_class=2)
    (tmp_path / "broken" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        load_dataset({"name": "image_folder"}, str(tmp_path / "broken"))
    _, data = load_dataset({"name": "image_folder", "on_unreadable": "skip", "test_fraction": 0.5}, str(tmp_path / "broken"))
    assert len(data.train_labels) + len(data.test_labels) == 4  # the broken file is left out


def test_missing_data_dir_and_unknown_dataset_are_refused():
    with pytest.raises(UserError, match="data_dir: '/no/such'"):
        load_dataset({"name": "cifar10"}, "/no/such")
    with pytest.raises(UserError, match="unknown dataset 'cifar11'.*cifar10"):
        load_dataset({"name": "cifar11"}, None)
