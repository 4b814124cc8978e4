"""Hostile inputs and faults of pretraining, each refused in one line that names the key, file or folder, with
nothing half-written left behind: checkpoint intervals out of range, a full disk while writing the checkpoint or the
encoder, and a resume checkpoint (``last.pt``) that is truncated, not a checkpoint, or another pretraining's."""

from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import sslfuse
from hydra import compose, initialize_config_dir

import ssl_fusion.stages  # noqa: F401  (registers the stage schemas)
from ssl_fusion.config import CONF_DIR, ProbeConfig, TrainOverrides
from ssl_fusion.data.datasets.synthetic import SyntheticConfig, make_synthetic
from ssl_fusion.models.encoders import SmallCNNConfig
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.context import StageContext, open_context
from ssl_fusion.stages.pretrain import ensure_encoder, train_encoder
from ssl_fusion.store.artifacts import pretext_recipe
from ssl_fusion.store.files import ArtifactStore

NAME = "rotation-test"


def one_line(call: Callable[[], object]) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def context(store: Path, **overrides) -> StageContext:
    data = make_synthetic(SyntheticConfig(name="synthetic", n_train=32, n_test=16, image_size=12), store)
    return StageContext(
        data=data,
        dataset_cfg=SyntheticConfig(name="synthetic"),
        encoder_cfg=SmallCNNConfig(name="small_cnn"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        store=ArtifactStore(store),
        overrides=TrainOverrides(max_steps_per_epoch=2, **overrides),
        seed=0,
    )


def recipe(pretext: str = "rotation", epochs: int = 1):
    return dataclasses.replace(pretext_recipe(pretext, TrainOverrides()), batch_size=8, epochs=epochs)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.checkpoint_every_minutes=-1", "train.checkpoint_every_minutes must be >= 0"),
        ("train.checkpoint_every_minutes=nan", "train.checkpoint_every_minutes must be >= 0"),
        ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps must be > 0"),
    ],
)
def test_a_checkpoint_interval_out_of_range_is_refused(override: str, expected: str) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="pretrain", overrides=["preset=smoke", override])
    assert expected in one_line(lambda: open_context(cfg, 0))


def full_disk_on(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """``torch.save`` into a file whose name holds ``target`` writes a few bytes, then fails as a full disk does."""
    save = torch.save

    def filling(obj, handle, *args, **kwargs) -> None:
        if target not in str(getattr(handle, "name", handle)):
            return save(obj, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", filling)


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    """The second checkpoint's write fails: the run stops in one line naming the folder, the temporary file is gone
    and the first checkpoint is intact (a rerun resumes from it)."""
    ctx = context(tmp_path)
    train_encoder(ctx, recipe(epochs=1), NAME)
    folder = tmp_path / "checkpoints" / NAME
    first = (folder / "last.pt").read_bytes()
    full_disk_on(monkeypatch, ".last.pt.")
    message = one_line(lambda: train_encoder(ctx, recipe(epochs=2), NAME))
    assert str(folder) in message and "disk is full" in message
    assert sorted(path.name for path in folder.iterdir()) == ["last.pt"]
    assert (folder / "last.pt").read_bytes() == first


def test_a_full_disk_while_storing_the_encoder_is_one_line_and_leaves_no_staging_folder(tmp_path, monkeypatch) -> None:
    full_disk_on(monkeypatch, ".staging-")
    ctx = context(tmp_path)
    message = one_line(lambda: ensure_encoder(ctx, recipe(), ProbeConfig(max_train=32, max_test=16)))
    assert str(tmp_path / "encoders") in message and "disk is full" in message
    assert [path.name for path in (tmp_path / "encoders").iterdir() if not path.name.startswith(".lock")] == []


def truncated(path: Path, tmp_path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path, tmp_path: Path) -> None:
    path.write_bytes(b"")


def text(path: Path, tmp_path: Path) -> None:
    path.write_text("not a checkpoint\n")


def unrelated_tensors(path: Path, tmp_path: Path) -> None:
    torch.save({"weight": torch.zeros(3), "bias": torch.ones(2)}, path)


def a_list(path: Path, tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], path)


def other_pretext(path: Path, tmp_path: Path) -> None:
    """The checkpoint of a denoising pretraining, copied over this rotation pretraining's."""
    train_encoder(context(tmp_path / "other"), recipe("denoising"), "denoising-test")
    shutil.copy(tmp_path / "other" / "checkpoints" / "denoising-test" / "last.pt", path)


def other_pretext_unmarked(path: Path, tmp_path: Path) -> None:
    """As ``other_pretext``, in the format of checkpoints that did not record their pretraining."""
    other_pretext(path, tmp_path)
    state = torch.load(path, weights_only=True)
    del state["run"]
    torch.save(state, path)


@pytest.mark.parametrize(
    "damage", [truncated, empty, text, unrelated_tensors, a_list, other_pretext, other_pretext_unmarked]
)
def test_a_damaged_or_foreign_resume_checkpoint_is_refused_naming_the_folder_to_delete(tmp_path, damage) -> None:
    ctx = context(tmp_path / "store")
    train_encoder(ctx, recipe(epochs=1), NAME)
    folder = tmp_path / "store" / "checkpoints" / NAME
    damage(folder / "last.pt", tmp_path)
    message = one_line(lambda: train_encoder(ctx, recipe(epochs=2), NAME))
    assert f"delete the folder '{folder}'" in message


@pytest.mark.slow
def test_the_cli_refuses_a_truncated_resume_checkpoint_in_one_line(tmp_path) -> None:
    """End to end: ``sslfuse pretrain`` over a truncated ``last.pt`` exits 2 with one line and no traceback."""
    args = ["pretrain", "preset=smoke", "pretext=rotation", "train.checkpoint_every_steps=1"]
    sslfuse(*args, "hydra.run.dir=a", cwd=tmp_path)
    (encoder,) = (tmp_path / "outputs" / "artifacts" / "encoders").glob("rotation-*")
    folder = tmp_path / "outputs" / "artifacts" / "checkpoints" / encoder.name
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"PK\x03\x04truncated")
    shutil.rmtree(encoder)
    proc = sslfuse(*args, "hydra.run.dir=b", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"delete the folder 'outputs/artifacts/checkpoints/{encoder.name}'" in proc.stderr, proc.stderr
