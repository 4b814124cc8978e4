"""Features made elsewhere: imported arrays fuse exactly as the same arrays cached by sslfuse; bad files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sslfuse

from ssl_fusion.config import check_imported
from ssl_fusion.data.imported import ImportedFeatures, load_imported
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError

TRAIN_LABELS, TEST_LABELS = torch.arange(30) % 3, torch.arange(12) % 3


def write(path, array) -> str:
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        torch.save(array, path)
    return str(path)


def test_npy_and_pt_files_give_float_features_with_the_dataset_labels(tmp_path):
    train, test = (
        np.random.default_rng(0).normal(size=(30, 5)).astype(np.float16),
        torch.randn(12, 5, dtype=torch.float64),
    )
    spec = ImportedFeatures(write(tmp_path / "train.npy", train), write(tmp_path / "test.pt", test))
    features = load_imported("clip", spec, TRAIN_LABELS, TEST_LABELS)
    assert features.train.dtype == features.test.dtype == torch.float32
    assert torch.equal(features.train, torch.from_numpy(train).float()) and torch.allclose(features.test, test.float())
    assert torch.equal(features.train_labels, TRAIN_LABELS) and torch.equal(features.test_labels, TEST_LABELS)


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("train.npy", np.zeros((29, 5), np.float32), r"shape \(29, 5\), needs \(30, dim\)"),
        ("train.npy", np.zeros((30,), np.float32), r"shape \(30,\), needs \(30, dim\)"),
        ("train.npy", np.zeros((30, 5), np.int64), "dtype int64, a float dtype is needed"),
        ("train.npy", np.full((30, 5), np.nan, np.float32), "holds NaN or inf"),
        ("train.npy", np.array([{"a": 1}] * 30, dtype=object), "not readable as an array"),
        ("train.pt", {"features": torch.zeros(30, 5)}, "holds a dict, not one array"),
        ("train.csv", None, r"give a \.npy, \.pt, \.pth file"),
        ("absent.npy", None, "no such file"),
    ],
)
def test_each_bad_file_is_refused_in_one_line_naming_it(tmp_path, name, array, message):
    path = tmp_path / name
    if path.suffix == ".csv":
        path.write_text("1,2\n")
    elif array is not None:
        write(path, array)
    test = write(tmp_path / "test.npy", np.zeros((12, 5), np.float32))
    with pytest.raises(UserError, match=message) as refused:
        load_imported("clip", ImportedFeatures(str(path), test), TRAIN_LABELS, TEST_LABELS)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_splits_of_two_widths_and_names_of_built_in_pretexts_are_refused(tmp_path):
    spec = ImportedFeatures(
        write(tmp_path / "a.npy", np.zeros((30, 5), np.float32)),
        write(tmp_path / "b.npy", np.zeros((12, 4), np.float32)),
    )
    with pytest.raises(UserError, match="train has 5 columns and test 4"):
        load_imported("clip", spec, TRAIN_LABELS, TEST_LABELS)
    with pytest.raises(UserError, match="imported.rotation: the name of a built-in pretext"):
        check_imported({"rotation": {"train": "a.npy", "test": "b.npy"}}, PRETEXTS)
    with pytest.raises(UserError, match="give exactly imported.clip.train and imported.clip.test"):
        check_imported({"clip": {"train": "a.npy"}}, PRETEXTS)


def encoder_seed(features: Path) -> int:
    """The pretraining seed of the encoder whose cached features are in the folder ``features``."""
    encoder = json.loads((features / "manifest.json").read_text())["config"]["encoder_artifact"]
    return json.loads((features.parents[1] / "encoders" / encoder / "manifest.json").read_text())["config"]["seed"]


@pytest.mark.slow
def test_a_fuse_over_imported_arrays_equals_the_fuse_over_the_same_arrays_cached(smoke_workspace):
    """The smoke run's cached rotation features, copied out as .npy files and imported under another name, give the
    same result as the cached ones: the same L2, length, accuracy and weights for every fold and refit."""
    (folder,) = [f for f in (smoke_workspace / "outputs/artifacts/features").glob("rotation-*") if encoder_seed(f) == 0]
    imported = [f"+imported.rot_copy.{split}={folder / f'{split}.npy'}" for split in ("train", "test")]
    common = ["preset=smoke", "fusion=attention", "seed=1"]
    sslfuse("fuse", *common, "pretexts=[rotation,simclr]", "hydra.run.dir=cached", cwd=smoke_workspace)
    sslfuse("fuse", *common, "pretexts=[rot_copy,simclr]", *imported, "hydra.run.dir=imported", cwd=smoke_workspace)
    cached, copied = (
        json.loads((smoke_workspace / run / "results.json").read_text()) for run in ("cached", "imported")
    )
    assert copied["method"] == "attention(rot_copy+simclr)"
    for key in (
        "test_accuracy",
        "selected_l2",
        "selected_steps",
        "cv_accuracy",
        "labeled_indices_sha256",
        "screened_out",
    ):
        assert copied[key] == cached[key], key
    assert list(copied["mean_pretext_weights"].values()) == list(cached["mean_pretext_weights"].values())
