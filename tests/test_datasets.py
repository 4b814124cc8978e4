from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import needs_fashion_mnist
from PIL import Image

from ssl_fusion.config import ProbeConfig
from ssl_fusion.data.datasets import DEFAULT_DATA_ROOT, load_dataset, sample_indices
from ssl_fusion.data.datasets import torchvision_sets as tv_sets
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


CHUNKS, CHUNK = 40, 64  # the stand-in's file: 40 images of 8x8 pixels, written one a 50 ms


class SlowDownload:
    """A torchvision dataset's stand-in: its download writes the file in 40 chunks over 2 s, as a network would, and
    logs each download and each read of a part-written file to ``events.log`` beside it; without the file, or with
    part of it, and no download, it raises torchvision's RuntimeError."""

    def __init__(self, root: Path, train: bool, download: bool) -> None:
        path, events = Path(root) / "stand_in.bin", Path(root) / "events.log"
        if download and not self.complete(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(events, "a") as log:
                log.write(f"download {os.getpid()}\n")
            with open(path, "wb") as handle:
                for chunk in range(CHUNKS):
                    handle.write(bytes([chunk]) * CHUNK)
                    handle.flush()
                    time.sleep(0.05)
        content = path.read_bytes() if path.is_file() else b""
        if len(content) != CHUNKS * CHUNK:
            if content:
                with open(events, "a") as log:
                    log.write(f"partial {os.getpid()}\n")
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        self.data = np.frombuffer(bytearray(content), dtype=np.uint8).reshape(CHUNKS, 1, 8, 8)
        self.targets = [chunk % 2 for chunk in range(CHUNKS)]

    @staticmethod
    def complete(path: Path) -> bool:
        return path.is_file() and path.stat().st_size == CHUNKS * CHUNK


def download_worker(rank: int, folder: Path, start: object, locked: bool) -> None:
    """One of two processes loading the stand-in at once into ``outputs/data`` under ``folder``, as torchrun's ranks
    do before their process group exists; ``locked=False``: torchvision called directly, as before the lock."""
    os.chdir(folder)
    if not locked:
        tv_sets.fetch = lambda factory, root, train, download: factory(root, train, download)
    cfg = tv_sets.TorchvisionConfig(name="stand_in")
    start.wait()
    data = tv_sets.load_torchvision("stand_in", SlowDownload, cfg, DEFAULT_DATA_ROOT)
    torch.save(data.train_images, folder / f"rank{rank}.pt")


def load_in_two_processes(folder: Path, locked: bool) -> list[str]:
    """The events of two processes loading the stand-in at once (a failed load leaves its rank's file out)."""
    context = mp.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=download_worker, args=(r, folder, start, locked)) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    events = folder / DEFAULT_DATA_ROOT / "events.log"
    return events.read_text().split() if events.is_file() else []


@pytest.mark.slow
def test_processes_that_start_at_once_download_once_and_read_the_whole_file(tmp_path):
    """Known truth: the file holds chunk k's index in its k-th 64 bytes. Two processes that load the dataset at once
    (as torchrun's ranks do) download it once: one downloads, the other waits on the lock, then reads the complete
    file without downloading. Paired control: the same two processes calling torchvision directly, as before the
    lock, both download or read a part-written file."""
    expected = torch.arange(CHUNKS, dtype=torch.uint8).repeat_interleave(CHUNK).view(CHUNKS, 1, 8, 8)
    locked = tmp_path / "locked"
    locked.mkdir()
    events = load_in_two_processes(locked, locked=True)
    assert events.count("download") == 1 and "partial" not in events
    for rank in range(2):
        assert torch.equal(torch.load(locked / f"rank{rank}.pt"), expected)
    unlocked = tmp_path / "unlocked"
    unlocked.mkdir()
    events = load_in_two_processes(unlocked, locked=False)
    assert events.count("download") == 2 or "partial" in events


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
