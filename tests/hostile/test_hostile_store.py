"""Hostile inputs and faults at the artifact store and the cache stage: each is refused in one line naming the key,
file or encoder, and leaves nothing half-written; what can be served (a read-only store's artifacts, a big-endian
array) is served."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision
from conftest import synthetic_context
from torch import nn

import ssl_fusion.store.files as files
from ssl_fusion.config import check_external
from ssl_fusion.data.imported import checked_split
from ssl_fusion.models.checkpoints import load_external_encoder
from ssl_fusion.models.external import ExternalEncoder, ExternalEncoderConfig
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import caching as cache_stage
from ssl_fusion.stages.context import StageContext
from ssl_fusion.store.artifacts import FEATURES_KIND, load_features
from ssl_fusion.store.files import ArtifactStore, atomic_write_bytes

ARCH = "torchvision:resnet18"


def refused(call: Callable[[], object]) -> str:
    """The one-line message of the UserError that ``call`` raises."""
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def leftovers(root: Path) -> list[str]:
    """What a failed build left in the store: anything but the lock files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".locks" not in p.parts)


def tiny_context(root: Path) -> StageContext:
    return synthetic_context(root, 24, 12)


class Constant(nn.Module):
    """A backbone whose features ignore the image: ``value`` everywhere (what int weights cast to zero gave)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((len(images), 8), self.value)


class Linear(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.layer, self.scale = nn.Linear(3 * 16 * 16, 8), scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images.flatten(1)) * self.scale


def cache_external(ctx: StageContext, monkeypatch, backbone: nn.Module, image_size: int = 16) -> tuple[str, dict, bool]:
    """Cache the features of external encoder ``enc`` whose backbone is ``backbone`` (8 features an image)."""
    cfg = ExternalEncoderConfig(arch=ARCH, image_size=image_size)
    encoder = ExternalEncoder(backbone, 8, cfg).eval()
    monkeypatch.setattr(cache_stage, "build_external", lambda cfg, channels: (encoder, "test"))
    return cache_stage.ensure_external_features(ctx, "enc", cfg, batch_size=8)


# Item 4: broken weights give broken features; they are refused, never cached.


def checkpoint_with(tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A resnet18 checkpoint with one damaged tensor, and that tensor's key."""
    state = torchvision.models.resnet18().state_dict()
    key = "layer1.0.conv1.weight"
    if damage == "int32 safetensors":
        from safetensors.torch import save_file

        state[key] = (state[key] * 100).to(torch.int32)
        path = tmp_path / "ints.safetensors"
        save_file(state, str(path))
        return path, key
    if damage == "nan":
        state[key][0, 0, 0, 0] = float("nan")
    elif damage == "sparse":
        state[key] = state[key].to_sparse()
    path = tmp_path / f"{damage}.pth"
    torch.save(state, path)
    return path, key


@pytest.mark.parametrize(
    ("damage", "says"), [("int32 safetensors", "int32 values"), ("nan", "NaN"), ("sparse", "sparse")]
)
def test_a_checkpoint_tensor_that_would_give_wrong_features_is_refused_naming_file_and_tensor(tmp_path, damage, says):
    path, key = checkpoint_with(tmp_path, damage)
    message = refused(lambda: load_external_encoder(ARCH, path))
    assert str(path) in message and key in message and says in message


@pytest.mark.parametrize(
    ("backbone", "says"),
    [
        (Constant(0.0), "the same features for every image"),
        (Constant(float("nan")), "NaN"),
        (Linear(scale=1e6), "infinite (beyond float16"),
    ],
)
def test_features_that_carry_nothing_are_refused_naming_the_encoder_and_nothing_is_cached(
    tmp_path, monkeypatch, backbone, says
):
    ctx = tiny_context(tmp_path / "store")
    message = refused(lambda: cache_external(ctx, monkeypatch, backbone))
    assert "encoder 'enc'" in message and says in message
    assert leftovers(tmp_path / "store") == [FEATURES_KIND]


# Item 8: a full disk is refused in one line, up front or when a write fails, and leaves nothing behind.


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_caching_more_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    ctx = tiny_context(tmp_path / "store")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    message = refused(lambda: cache_external(ctx, monkeypatch, Linear()))
    assert "MiB free" in message and str(tmp_path / "store") in message
    assert leftovers(tmp_path / "store") == [FEATURES_KIND]


@pytest.mark.parametrize("failing", ["posix_fallocate", "fsync"])
def test_a_write_that_finds_the_disk_full_is_refused_and_leaves_no_staging_folder(tmp_path, monkeypatch, failing):
    """The features' file cannot be allocated (no SIGBUS later), or the manifest cannot be written."""
    ctx = tiny_context(tmp_path / "store")
    monkeypatch.setattr(os, failing, no_space)
    message = refused(lambda: cache_external(ctx, monkeypatch, Linear()))
    assert "no space left" in message
    assert leftovers(tmp_path / "store") == [FEATURES_KIND]


def test_an_atomic_write_on_a_full_disk_names_the_file_and_removes_its_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", no_space)
    assert str(tmp_path / "results.json") in refused(lambda: atomic_write_bytes(tmp_path / "results.json", b"{}"))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_builds_staging_folders_are_removed_and_a_live_ones_kept(tmp_path):
    """The next build to take a lock removes the staging folders of its own artifact and of artifacts whose lock is
    free (their builds were killed); one whose build holds its lock stays."""
    store, things = ArtifactStore(tmp_path), tmp_path / "things"
    with store.lock("things", "live-1"):
        (things / ".locks" / "dead-1.lock").touch()
        for name in ("dead-1", "next-1", "live-1"):
            (things / f".staging-{name}-abc123").mkdir()
        with store.lock("things", "next-1"):
            remaining = sorted(p.name for p in things.glob(".staging-*"))
    assert remaining == [".staging-live-1-abc123"]


# Item 10: a store that cannot be written serves what it holds; reading needs no lock.


def read_only(monkeypatch, code: int) -> None:
    """Opening a file to write fails as in a read-only store (tests run as root, whom chmod does not stop)."""

    def opening(path, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            raise OSError(code, os.strerror(code), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", opening, raising=False)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_store_serves_its_artifacts_and_refuses_a_build_in_one_line(tmp_path, monkeypatch, code):
    ctx = tiny_context(tmp_path / "store")
    name, manifest, _ = cache_external(ctx, monkeypatch, Linear())
    read_only(monkeypatch, code)
    assert cache_external(ctx, monkeypatch, Linear()) == (name, manifest, True)
    message = refused(lambda: cache_external(ctx, monkeypatch, Linear(), image_size=32))
    assert "cannot be written" in message and "artifacts_dir" in message


# Items 12 and 13: external encoder declarations; the name is one plain path component, refused before any file.


@pytest.mark.parametrize(
    ("name", "node", "key"),
    [
        ("enc", {"image_size": "big"}, "external.enc.image_size"),
        ("enc", {"image_size": 22.5}, "external.enc.image_size"),
        ("enc", {"image_size": 20000}, "external.enc.image_size: a whole number of pixels from 8 to 4096"),
        ("enc", {"mean": 0.5}, "external.enc.mean: one value per channel"),
        ("enc", {"std": [0.2, 0.2]}, "external.enc.std: one value per channel"),
        ("enc", {"mean": [float("nan"), 0.5, 0.5]}, "external.enc.mean: three finite numbers"),
        ("../../outside", {}, "external.../../outside: an encoder's name is"),
        ("a/b", {}, "external.a/b: an encoder's name is"),
        ("..", {}, "external..."),
        (".hidden", {}, "external..hidden"),
    ],
)
def test_a_bad_external_declaration_is_refused_in_one_line_naming_the_key(tmp_path, monkeypatch, name, node, key):
    monkeypatch.chdir(tmp_path)
    message = refused(lambda: check_external({name: {"arch": ARCH, **node}}, PRETEXTS))
    assert message.startswith(key), message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x-1", "a/b-1", "..", ".locks", ""])
def test_the_store_refuses_an_artifact_name_that_is_not_one_folder_before_writing(tmp_path, name):
    store = ArtifactStore(tmp_path / "store")

    def build() -> None:
        with store.lock("features", name), store.staging("features", name):
            pass

    assert "artifact name" in refused(build)
    assert not (tmp_path / "store").exists()


# Items 12 and 13: a manifest that is not one, or that does not list every file of its artifact.


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda folder: (folder / files.MANIFEST).write_text("[1, 2]"), "not a JSON object with a 'files' object"),
        (lambda folder: (folder / files.MANIFEST).write_text('{"kind": "things"}'), "not a JSON object with a 'files'"),
        (lambda folder: (folder / files.MANIFEST).write_text("{not json"), "is not JSON"),
        (lambda folder: (folder / files.MANIFEST).write_bytes(b"\xff\xfe"), "is not JSON"),
        (lambda folder: (folder / "extra.npy").write_bytes(b"planted"), "extra.npy' is not in its manifest"),
    ],
    ids=["list", "no files", "not json", "not utf-8", "unlisted file"],
)
def test_a_damaged_manifest_is_refused_naming_the_folder_to_delete(tmp_path, damage, says):
    store = ArtifactStore(tmp_path)
    with store.staging("things", "thing-1") as scratch:
        (scratch / "data.bin").write_bytes(b"data")
        store.publish("things", "thing-1", scratch, {})
    damage(tmp_path / "things" / "thing-1")
    message = refused(lambda: store.manifest("things", "thing-1"))
    assert says in message and f"delete '{tmp_path / 'things' / 'thing-1'}'" in message


@pytest.mark.parametrize("short", ["train", "test"])
def test_cached_features_with_fewer_rows_than_labels_are_refused(tmp_path, short):
    store = ArtifactStore(tmp_path)
    with store.staging(FEATURES_KIND, "enc-1") as scratch:
        for split, rows in (("train", 6), ("test", 4)):
            np.save(scratch / f"{split}.npy", np.ones((rows - (split == short), 3), np.float16))
            np.save(scratch / f"{split}_labels.npy", np.zeros(rows, np.int64))
        store.publish(FEATURES_KIND, "enc-1", scratch, {"config": {}})
    assert f"{short}.npy has shape" in refused(lambda: load_features(store, "enc-1"))


# Items 12 and 14: imported arrays.


def test_a_big_endian_npy_is_read_as_its_values(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "big.npy", values.astype(">f4"))
    torch.testing.assert_close(checked_split("clip", str(tmp_path / "big.npy"), 4), torch.from_numpy(values))


@pytest.mark.parametrize(
    ("array", "suffix", "says"),
    [
        (np.full((4, 3), 1e39), ".npy", "beyond float32's range"),
        (torch.eye(4, 3).to_sparse(), ".pt", "a sparse_coo tensor; save a dense one"),
    ],
    ids=["overflow", "sparse"],
)
def test_an_imported_array_float32_cannot_hold_is_refused_saying_why(tmp_path, array, suffix, says):
    path = tmp_path / f"features{suffix}"
    np.save(path, array) if suffix == ".npy" else torch.save(array, path)
    message = refused(lambda: checked_split("clip", str(path), 4))
    assert str(path) in message and says in message
