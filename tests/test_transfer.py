"""Transfer: encoders pretrained on one dataset, cached and fused on another with another size and channel count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fashion_mnist, sslfuse
from omegaconf import OmegaConf
from PIL import Image

from ssl_fusion.data.convert import converter, describe
from ssl_fusion.data.datasets import load_dataset
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import pretraining_dataset


def test_gray_is_repeated_rgb_becomes_luminance_and_sizes_are_resized():
    gray = torch.rand(2, 1, 8, 8)
    assert converter(1, (8, 8), 1, (8, 8)) is None
    torch.testing.assert_close(converter(1, (8, 8), 3, (8, 8))(gray), gray.expand(-1, 3, -1, -1))
    rgb = torch.rand(2, 3, 8, 8)
    luminance = 0.299 * rgb[:, :1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:]
    torch.testing.assert_close(converter(3, (8, 8), 1, (8, 8))(rgb), luminance)
    resized = converter(3, (8, 8), 1, (16, 16))(rgb)
    torch.testing.assert_close(
        resized, F.interpolate(luminance, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    )
    assert describe(3, (24, 24), 1, (16, 16)) == {"channels": "3 -> 1 (luminance)", "size": "24x24 -> 16x16"}
    with pytest.raises(UserError, match="cannot feed 2-channel images to an encoder pretrained on 3 channels"):
        converter(2, (8, 8), 3, (8, 8))


def test_pretraining_on_the_downstream_dataset_keeps_todays_context_and_keys():
    """``pretrain_dataset`` unset, or naming the very dataset configured, adds nothing: encoder keys stay those of a
    same-dataset run."""
    dataset_cfg, _ = load_dataset({"name": "synthetic"}, None)
    for node in (None, "synthetic", {"name": "synthetic"}):
        assert pretraining_dataset(OmegaConf.create({"pretrain_dataset": node, "data_dir": None}), dataset_cfg) == (
            None,
            None,
        )
    other_cfg, other = pretraining_dataset(
        OmegaConf.create({"pretrain_dataset": {"name": "synthetic", "image_size": 12}, "data_dir": None}), dataset_cfg
    )
    assert other_cfg.image_size == 12 and other.image_size == (12, 12)


@pytest.mark.slow
def test_an_encoder_pretrained_on_gray_16px_images_is_cached_and_fused_on_rgb_24px_ones(tmp_path):
    """``sslfuse run`` with another pretraining dataset: the encoder is pretrained on it (its manifest says so), the
    downstream RGB images are converted to gray 16 px for it (the features' manifest says so), and the fuse runs on
    the downstream labels."""
    pretrain = "pretrain_dataset={name:synthetic,image_size:16,n_train:256,n_test:64}"
    sslfuse(
        "run",
        "preset=smoke",
        pretrain,
        "dataset.channels=3",
        "dataset.image_size=24",
        "dataset.n_train=256",
        "dataset.n_test=64",
        "pretexts=[rotation]",
        "fusions=[concat]",
        "seeds=[0]",
        "labels.per_class=5",
        "hydra.run.dir=transfer",
        cwd=tmp_path,
    )
    store = tmp_path / "outputs/artifacts"
    ((encoder_manifest,), (features_manifest,)) = (
        [json.loads(p.read_text()) for p in (store / kind).glob("rotation-*/manifest.json")]
        for kind in ("encoders", "features")
    )
    assert encoder_manifest["data"]["channels"] == 1 and encoder_manifest["data"]["image_size"] == [16, 16]
    assert encoder_manifest["data"]["n_train"] == 256
    assert features_manifest["config"]["conversion"] == {"channels": "3 -> 1 (luminance)", "size": "24x24 -> 16x16"}
    assert features_manifest["metrics"]["n_test"] == 64
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "transfer/fuse").rglob("results.json")]
    # 4 classes, 64 test images: 0.6 stands over 5 standard errors above chance (0.25); measured 0.96 ± 0.01, seeds 0-2
    assert result["n_labeled"] == 20 and result["test_accuracy"] > 0.6


def folder_contents(folder) -> dict[str, bytes]:
    """Every file and folder under ``folder`` (relative path -> bytes; b"" for a folder)."""
    return {p.relative_to(folder).as_posix(): b"" if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def write_png_folder(folder, classes=2, per_class=6, size=12) -> None:
    """``per_class`` random RGB PNGs of ``size`` px in each of ``classes`` class folders (seeded)."""
    generator = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_a_dataset_missing_from_its_data_dir_is_refused_and_nothing_is_written_there(tmp_path, name):
    """A user's data_dir is only read: a stock dataset not found there is refused in one line, not downloaded there."""
    write_png_folder(tmp_path / "mine")
    before = folder_contents(tmp_path / "mine")
    with pytest.raises(UserError, match=f"dataset {name}: not found under data_dir") as refused:
        load_dataset({"name": name, "data_dir": str(tmp_path / "mine")})
    assert "\n" not in str(refused.value) and folder_contents(tmp_path / "mine") == before


def test_each_dataset_has_its_own_data_dir_and_the_top_level_one_is_the_downstream_default(tmp_path):
    write_png_folder(tmp_path / "mine")
    downstream, _ = load_dataset({"name": "image_folder", "image_size": 8}, str(tmp_path / "mine"))
    assert downstream.data_dir == str(tmp_path / "mine")
    own, _ = load_dataset({"name": "image_folder", "image_size": 8, "data_dir": str(tmp_path / "mine")}, "/no/such")
    assert own.data_dir == str(tmp_path / "mine")
    with pytest.raises(UserError, match="^dataset.data_dir: '/no/such' does not exist"):
        load_dataset({"name": "image_folder", "data_dir": "/no/such"})
    cfg = OmegaConf.create(
        {"data_dir": str(tmp_path / "mine"), "pretrain_dataset": {"name": "image_folder", "image_size": 8}}
    )
    assert pretraining_dataset(cfg, downstream) == (None, None)  # unset: the downstream folder, the same data
    cfg.pretrain_dataset = {"name": "synthetic", "image_size": 8, "n_train": 8, "n_test": 8}
    pretrain_cfg, _ = pretraining_dataset(cfg, downstream)
    assert pretrain_cfg.data_dir is None  # the top-level data_dir is the downstream dataset's, not the pretraining's


@pytest.mark.slow
@needs_fashion_mnist
def test_transfer_from_fashion_mnist_to_an_image_folder_leaves_the_folder_untouched(tmp_path):
    """``sslfuse run dataset=image_folder data_dir=<folder> pretrain_dataset=fashion_mnist``: the encoder is pretrained
    on Debian's Fashion-MNIST (not looked for in the folder), fused on the folder's labels; a failed try (Fashion-MNIST
    looked for in the folder, where it is not) and the successful run leave the folder byte for byte as it was."""
    folder, work = tmp_path / "pngs", tmp_path / "work"
    write_png_folder(folder)
    work.mkdir()
    before = folder_contents(folder)
    short = (
        "dataset=image_folder",
        "dataset.image_size=12",
        "dataset.test_fraction=0.5",
        "pretexts=[rotation]",
        "fusions=[concat]",
        "seeds=[0]",
        "labels.per_class=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=2",
        "train.num_workers=0",
        "cache.num_workers=0",
        "probe.max_train=100",
        "probe.max_test=50",
    )
    failed = sslfuse(
        "run",
        *short,
        f"dataset.data_dir={folder}",
        f"pretrain_dataset={{name:fashion_mnist,data_dir:{folder}}}",
        "hydra.run.dir=failed",
        cwd=work,
        check=False,
    )
    assert failed.returncode == 2
    assert "pretrain_dataset: dataset fashion_mnist: not found under data_dir" in failed.stderr
    assert folder_contents(folder) == before
    sslfuse("run", *short, f"data_dir={folder}", "pretrain_dataset=fashion_mnist", "hydra.run.dir=transfer", cwd=work)
    assert folder_contents(folder) == before
    encoders = (work / "outputs/artifacts/encoders").glob("rotation-*/manifest.json")
    (encoder_manifest,) = [json.loads(p.read_text()) for p in encoders]
    assert encoder_manifest["config"]["dataset"] == "fashion_mnist"
    assert encoder_manifest["data"]["image_size"] == [28, 28]
    (result,) = [json.loads(p.read_text()) for p in (work / "transfer/fuse").rglob("results.json")]
    assert result["dataset"] == "image_folder" and result["n_labeled"] == 4
