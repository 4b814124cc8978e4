"""Hostile data: label split files, image folders and dataset keys that must be refused in one line naming the key or
the file (exit code 2, no traceback, nothing written), and images read at their true scale or left out as asked."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import sslfuse
from omegaconf import OmegaConf
from PIL import Image

from ssl_fusion.config import LabelsConfig
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.data.datasets.image_folder import FolderImages
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import pretraining_dataset

LABELS = torch.arange(40) % 4  # 4 classes of 10 training images


def write_pngs(folder: Path, per_class: tuple[int, ...] = (6, 6), size: int = 8) -> Path:
    """``per_class[c]`` random RGB PNGs of ``size`` px in class folder ``c<c>`` (seeded)."""
    generator = np.random.default_rng(0)
    for c, count in enumerate(per_class):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(count):
            pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"c{c}" / f"{i}.png")
    return folder


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb(path: Path, side: int = 20000) -> Path:
    """A PNG of a few bytes whose header declares ``side`` x ``side`` RGB pixels: more than twice PIL's
    Image.MAX_IMAGE_PIXELS, so opening it raises DecompressionBombError (not an OSError)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(bytes(64)))
        + png_chunk(b"IEND", b"")
    )
    return path


def indices_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "split.txt"
    path.write_bytes(content)
    return path


def folder_with_bomb(tmp_path: Path) -> Path:
    folder = write_pngs(tmp_path / "pngs")
    write_bomb(folder / "c0" / "bomb.png")
    return folder


HUGE_INDEX, NOT_UTF8 = b"0\n1180591620717411303424\n", b"0\n\xff\xfe1\n"  # 2**70; bytes that are no UTF-8

# id -> (what to build in tmp_path, returning the CLI arguments; what the one line must name)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "indices_2_pow_70": (
        lambda t: ["preset=smoke", f"labels.indices_file={indices_file(t, HUGE_INDEX)}"],
        "labels.indices_file '{t}/split.txt': index 1180591620717411303424 is outside",
    ),
    "indices_not_utf8": (
        lambda t: ["preset=smoke", f"labels.indices_file={indices_file(t, NOT_UTF8)}"],
        "labels.indices_file '{t}/split.txt': not UTF-8",
    ),
    "class_of_one_image": (
        lambda t: ["dataset=image_folder", f"data_dir={write_pngs(t / 'pngs', (6, 1))}"],
        "class folder '{t}/pngs/c1' has 1 image(s)",
    ),
    "test_fraction_0.01": (
        lambda t: ["dataset=image_folder", f"data_dir={write_pngs(t / 'pngs')}", "dataset.test_fraction=0.01"],
        "dataset.test_fraction=0.01 leaves a class of '{t}/pngs' without a train or a test image",
    ),
    "image_size_0": (
        lambda t: ["dataset=image_folder", f"data_dir={write_pngs(t / 'pngs')}", "dataset.image_size=0"],
        "dataset.image_size must be > 0",
    ),
    "pretrain_dataset_5": (
        lambda t: ["preset=smoke", "pretrain_dataset=5"],
        "pretrain_dataset must be a dataset's name",
    ),
    "decompression_bomb": (
        lambda t: ["dataset=image_folder", f"data_dir={folder_with_bomb(t)}"],
        "cannot read image '{t}/pngs/c0/bomb.png' (Image size (400000000 pixels) exceeds limit",
    ),
    "pretrain_data_dir_lacks_it": (
        lambda t: ["preset=smoke", f"pretrain_dataset={{name:mnist,data_dir:{write_pngs(t / 'pngs')}}}"],
        "pretrain_dataset: dataset mnist: not found under data_dir '{t}/pngs'",
    ),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): b"" if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_data_is_refused_by_the_cli_in_one_line_and_nothing_is_written(tmp_path, case):
    """``sslfuse run`` refuses with exit code 2 and one line naming the key or the file; the user's files stay as they
    were and the store holds nothing."""
    make, expected = CASES[case]
    user, work = tmp_path / "user", tmp_path / "work"
    user.mkdir()
    work.mkdir()
    args = make(user)
    before = snapshot(user)
    proc = sslfuse("run", *args, "hydra.run.dir=refused", cwd=work, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert expected.format(t=user) in proc.stderr, proc.stderr
    assert snapshot(user) == before
    assert not (work / "outputs" / "artifacts").exists() and not list(work.rglob("results.json"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (HUGE_INDEX, "index 1180591620717411303424 is outside the training split"),
        (b"[0, -1180591620717411303424]", "index -1180591620717411303424 is outside the training split"),
        (NOT_UTF8, "not UTF-8 text"),
        (b"[" * 100000, "not a JSON list or one integer index per line"),
    ],
)
def test_a_hostile_indices_file_is_refused_in_one_line_naming_it(tmp_path, content, message):
    path = indices_file(tmp_path, content)
    with pytest.raises(UserError, match=message) as refused:
        LabelsConfig(indices_file=str(path)).subset(LABELS, seed=0)
    assert str(refused.value).startswith(f"labels.indices_file '{path}'") and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("per_class", "options", "message"),
    [
        ((6, 1), {}, "class folder '{root}/c1' has 1 image"),
        ((6, 6), {"test_fraction": 0.01}, "dataset.test_fraction=0.01 leaves a class"),
        ((6, 6), {"test_fraction": 0.99}, "dataset.test_fraction=0.99 leaves a class"),
        (
            (30, 2, 2),
            {"test_fraction": 0.1},
            "dataset.test_fraction=0.1 leaves a class",
        ),  # 4 test images, all of class 0
        ((6, 6), {"image_size": 0}, "dataset.image_size must be > 0"),
        ((6, 6), {"image_size": -4}, "dataset.image_size must be > 0"),
    ],
)
def test_an_image_folder_that_cannot_be_split_or_sized_is_refused_in_one_line(tmp_path, per_class, options, message):
    root = write_pngs(tmp_path / "pngs", per_class)
    with pytest.raises(UserError) as refused:
        load_dataset({"name": "image_folder", "image_size": 8, **options}, str(root))
    assert message.format(root=root) in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (5, "pretrain_dataset must be a dataset's name"),
        ([1, 2], "pretrain_dataset must be a dataset's name"),
        ("cifar11", "pretrain_dataset: unknown dataset 'cifar11'"),
        ({"name": "synthetic", "n_trian": 4}, "pretrain_dataset.n_trian"),
        ({"name": "image_folder", "data_dir": "/no/such"}, "pretrain_dataset.data_dir: '/no/such' does not exist"),
    ],
)
def test_a_pretrain_dataset_that_is_no_dataset_is_refused_in_one_line_naming_the_key(node, message):
    downstream, _ = load_dataset({"name": "synthetic", "n_train": 8, "n_test": 8})
    with pytest.raises(UserError) as refused:
        pretraining_dataset(OmegaConf.create({"pretrain_dataset": node, "data_dir": None}), downstream)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("on_unreadable", ["refuse", "skip"])
def test_a_decompression_bomb_is_refused_naming_it_or_skipped(tmp_path, on_unreadable):
    root = write_pngs(tmp_path / "pngs", (4, 4))
    bomb = write_bomb(root / "c0" / "bomb.png")
    node = {"name": "image_folder", "image_size": 8, "test_fraction": 0.5, "on_unreadable": on_unreadable}
    if on_unreadable == "refuse":
        with pytest.raises(UserError, match=f"cannot read image '{bomb}'.*decompression bomb"):
            load_dataset(node, str(root))
    else:
        _, data = load_dataset(node, str(root))
        assert len(data.train_labels) + len(data.test_labels) == 8  # the bomb is left out


def decoded(path: Path, channels: int = 1) -> torch.Tensor:
    return FolderImages(path.parent, [path.name], 4, channels)[0]


def test_a_16_bit_png_is_scaled_to_8_bits_not_saturated(tmp_path):
    """Gray levels 0, 1/4, 1/2 and full of 65535 read as 0, 64, 128 and 255 (PIL alone clips every one above 255)."""
    Image.fromarray(np.tile(np.array([0, 16384, 32768, 65535], dtype=np.uint16), (4, 1))).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    image = decoded(tmp_path / "wide.png")
    assert image.dtype == torch.uint8 and image[0, 0].tolist() == [0, 64, 128, 255]
    assert torch.equal(decoded(tmp_path / "wide.png", channels=3), image.expand(3, -1, -1))


def test_a_float_tiff_in_0_1_is_scaled_to_8_bits_and_one_outside_is_refused_naming_it(tmp_path):
    """Float pixels 0, 0.25, 0.5 and 1 read as 0, 64, 128 and 255 (PIL alone truncates them to 0 and 1); floats outside
    [0, 1] have no known scale: refused naming the file (on_unreadable=skip leaves such a file out)."""
    Image.fromarray(np.tile(np.array([0, 0.25, 0.5, 1], dtype=np.float32), (4, 1))).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert decoded(tmp_path / "float.tif")[0, 0].tolist() == [0, 64, 128, 255]
    Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(UserError, match=r"cannot read image '.*big.tif' \(mode F pixels in \[200.0, 200.0\]"):
        decoded(tmp_path / "big.tif")


def test_a_class_the_indices_file_leaves_without_labels_is_warned_about_and_recorded(tmp_path, caplog):
    path = indices_file(tmp_path, b"\n".join(str(i).encode() for i in range(40) if i % 4 != 2))
    labels_cfg = LabelsConfig(indices_file=str(path))
    with caplog.at_level(logging.WARNING, logger="sslfuse"):
        labeled = labels_cfg.subset(LABELS, seed=0)
    assert "labels no image of class(es) [2]" in caplog.text and str(path) in caplog.text
    assert labels_cfg.fields(labeled, 0, LABELS)["classes_without_labels"] == [2]
    every = LabelsConfig(per_class=2)
    assert every.fields(every.subset(LABELS, seed=0), 0, LABELS)["classes_without_labels"] == []
