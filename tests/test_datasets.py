from __future__ import annotations

import pytest
import torch
from conftest import needs_fashion_mnist
from PIL import Image

from ssl_fusion.config import ProbeConfig
from ssl_fusion.data.datasets import load_dataset, sample_indices
from ssl_fusion.models.encoders import SmallCNNConfig, build_encoder
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import probe_encoder


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
    assert data.classes == [str(digit) for digit in range(10)]  # each class is named by its digit


@needs_fashion_mnist
def test_fashion_mnist_from_debian_files():
    _, data = load_dataset({"name": "fashion_mnist", "max_test": 500}, None)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (500, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    assert data.classes == [  # the dataset's own names, in the order of the labels 0-9
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]


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
    _, data = load_dataset(
        {"name": "image_folder", "on_unreadable": "skip", "test_fraction": 0.5}, str(tmp_path / "broken")
    )
    assert len(data.train_labels) + len(data.test_labels) == 4  # the broken file is left out


def test_missing_data_dir_and_unknown_dataset_are_refused():
    with pytest.raises(UserError, match="data_dir: '/no/such'"):
        load_dataset({"name": "cifar10"}, "/no/such")
    with pytest.raises(UserError, match="unknown dataset 'cifar11'.*cifar10"):
        load_dataset({"name": "cifar11"}, None)


def class_sorted_folder(tmp_path, classes=4, per_class=10):
    """An image_folder with train/ and test/ sub-folders, read in class order; every image of class c is the gray
    level 60 * c, so an image's class can be read off its pixels."""
    for split in ("train", "test"):
        for c in range(classes):
            (tmp_path / split / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), color=(60 * c,) * 3).save(tmp_path / split / f"class{c}" / f"{i}.png")
    _, data = load_dataset({"name": "image_folder", "image_size": 8}, str(tmp_path))
    for labels in (data.train_labels, data.test_labels):
        assert torch.equal(labels, labels.sort().values)  # sorted by class: the first images are all class 0
    return data


def classes_of(images: torch.Tensor) -> set[int]:
    return set((images.float().mean(dim=(1, 2, 3)) / 60).round().long().tolist())


def test_encoder_statistics_come_from_a_seeded_sample_of_every_class(tmp_path):
    data = class_sorted_folder(tmp_path)
    sample = sample_indices(len(data.train_labels), 12, seed=0)
    assert len(sample) == 12 and set(data.train_labels[sample].tolist()) == {0, 1, 2, 3}
    assert torch.equal(sample, sample_indices(len(data.train_labels), 12, seed=0))
    assert torch.equal(sample_indices(40, None), torch.arange(40)) and torch.equal(
        sample_indices(40, 100), torch.arange(40)
    )

    encoder = build_encoder(SmallCNNConfig(name="small_cnn", widths=[8, 16]), 3)
    encoder.set_statistics(data.train_images, sample_size=12)
    pixels = data.train_images[sample].float() / 255
    assert torch.allclose(encoder.mean.flatten(), pixels.mean(dim=(0, 2, 3)))
    assert torch.allclose(encoder.std.flatten(), pixels.std(dim=(0, 2, 3)))
    assert encoder.mean.flatten()[0] > 0.1  # not the black class 0 alone, as the first 12 images are
    again = build_encoder(SmallCNNConfig(name="small_cnn", widths=[8, 16]), 3)
    again.set_statistics(data.train_images, sample_size=12)
    assert torch.equal(again.mean, encoder.mean) and torch.equal(again.std, encoder.std)


def test_probe_subsets_are_a_seeded_sample_of_every_class(tmp_path):
    data = class_sorted_folder(tmp_path)
    ctx = StageContext(None, data, None, torch.device("cpu"), torch.float32, None, None, 0)
    encoder = build_encoder(SmallCNNConfig(name="small_cnn", widths=[8, 16]), 3)
    encoder.set_statistics(data.train_images)
    seen: list[torch.Tensor] = []
    encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))

    probe = ProbeConfig(max_train=12, max_test=8)
    metrics = probe_encoder(ctx, encoder, probe)
    train_inputs, test_inputs = seen
    assert len(train_inputs) == 12 and len(test_inputs) == 8
    assert classes_of(train_inputs * 255) == {0, 1, 2, 3} and classes_of(test_inputs * 255) == {0, 1, 2, 3}
    seen.clear()
    assert probe_encoder(ctx, encoder, probe) == metrics
    assert torch.equal(seen[0], train_inputs) and torch.equal(seen[1], test_inputs)
