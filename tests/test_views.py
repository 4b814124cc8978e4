"""``cache.views=K``: features of K augmented copies of every train image, cached once, that heads train on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import sslfuse
from test_fusion import paired_standard_error

from ssl_fusion.config import LabelsConfig
from ssl_fusion.data.augment import random_shift_flip, shift_flip, shift_flip_params
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.fusion.concat import ConcatConfig
from ssl_fusion.fusion.protocol import fuse_once
from ssl_fusion.fusion.training import draw_batch

SMOKE = ("preset=smoke", "pretexts=[rotation]")


def test_shift_flip_moves_pixels_by_its_parameters():
    images = torch.rand(3, 1, 8, 8)
    identity, mirrored, shifted = (
        torch.tensor([[1.0, 0.0, 0.0]]),
        torch.tensor([[-1.0, 0.0, 0.0]]),
        torch.tensor([[1.0, 1 / 8, 0.0]]),
    )
    assert torch.allclose(shift_flip(images[:1], identity), images[:1], atol=1e-6)
    assert torch.allclose(shift_flip(images[:1], mirrored), images[:1].flip(-1), atol=1e-6)
    moved = shift_flip(
        images[:1], shifted
    )  # one pixel along x (affine_grid samples at x + shift: leftwards), zero fill
    assert torch.allclose(moved[..., :-1], images[:1, ..., 1:], atol=1e-6) and moved[..., -1].abs().max() < 1e-6


def test_shift_flip_params_are_seeded_and_in_range():
    first = shift_flip_params(1000, 0.1, generator=torch.Generator().manual_seed(3))
    again = shift_flip_params(1000, 0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert set(first[:, 0].tolist()) == {-1.0, 1.0} and 0.4 < (first[:, 0] < 0).float().mean() < 0.6
    assert first[:, 1:].abs().max() <= 0.1 and first[:, 1:].abs().max() > 0.09


def test_random_shift_flip_keeps_its_draws():
    """The batch augmentation of the pretexts draws exactly what it drew before views shared its code."""
    images = torch.rand(4, 1, 8, 8)
    torch.manual_seed(5)
    augmented = random_shift_flip(images, 0.2)
    torch.manual_seed(5)
    mirror = torch.where(torch.rand(4) < 0.5, -1.0, 1.0)
    shift = (torch.rand(4, 2) * 2 - 1) * 0.2
    assert torch.allclose(augmented, shift_flip(images, torch.cat([mirror[:, None], shift], 1)))


def test_one_view_draws_the_batches_plain_features_always_gave():
    """With one view a batch is the first ``batch_size`` of a permutation drawn from the generator (all samples when
    they fit), read from view 0; with more views each sample's view is drawn too, and varies."""
    view, index = draw_batch(torch.Generator().manual_seed(1), 50, 20, views=1)
    assert torch.equal(index, torch.randperm(50, generator=torch.Generator().manual_seed(1))[:20])
    assert (view == 0).all()
    view, index = draw_batch(torch.Generator().manual_seed(1), 10, 20, views=1)
    assert torch.equal(index, torch.arange(10)) and (view == 0).all()
    view, index = draw_batch(torch.Generator().manual_seed(1), 50, 20, views=4)
    assert view.shape == index.shape == (20,) and set(view.tolist()) <= {0, 1, 2, 3} and len(set(view.tolist())) > 1


def noisy_copies(views: int) -> FeatureSet:
    """Class centers in 16-d seen through heavy noise; each view is a fresh noisy look at the same train sample."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator)
    train_labels, test_labels = torch.arange(400) % 4, torch.arange(2000) % 4

    def look(labels: torch.Tensor) -> torch.Tensor:
        return centers[labels] + 1.5 * torch.randn(len(labels), 16, generator=generator)

    extra = torch.stack([look(train_labels) for _ in range(views)]) if views else None
    return FeatureSet(look(train_labels), look(test_labels), train_labels, test_labels, train_views=extra)


def test_heads_learn_from_cached_views():
    """Twelve labels of four classes: fresh views of them are more data, and a head trained on them does better on
    the 2000 test samples, by more than 3 paired standard errors (a bound: 4.3 points here): 0.714 to 0.882 at seed
    0, +13 to +30 points on seeds 0-4."""
    cfg, labels = ConcatConfig(name="concat", restarts=1), LabelsConfig(per_class=3)
    plain = fuse_once({"p": noisy_copies(0)}, cfg, labels, seed=0)
    viewed = fuse_once({"p": noisy_copies(16)}, cfg, labels, seed=0)
    assert plain["cached_views"] == 0 and viewed["cached_views"] == 16
    assert viewed["method"] == "concat[16 views](p)" and plain["method"] == "concat(p)"
    assert viewed["labeled_indices_sha256"] == plain["labeled_indices_sha256"]
    better, worse = viewed["test_accuracy"], plain["test_accuracy"]
    assert better - worse > 3 * paired_standard_error(better, worse), (better, worse)


@pytest.fixture(scope="module")
def views_workspace(tmp_path_factory):
    """A smoke rotation encoder with its features and two cached views (cache batch 64)."""
    folder = tmp_path_factory.mktemp("views")
    sslfuse("pretrain", "preset=smoke", "pretext=rotation", "hydra.run.dir=p", cwd=folder)
    sslfuse("cache", *SMOKE, "cache.views=2", "cache.batch_size=64", "hydra.run.dir=c", cwd=folder)
    return folder


def stored_views(folder):
    (path,) = (folder / "outputs/artifacts/views").glob("rotation-*/train_views.npy")
    return path, np.load(path)


@pytest.mark.slow
def test_cache_stores_views_that_differ_from_the_plain_features(views_workspace):
    path, views = stored_views(views_workspace)
    (features_path,) = (views_workspace / "outputs/artifacts/features").glob("rotation-*/train.npy")
    plain = np.load(features_path)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert views.shape == (2, *plain.shape) and views.dtype == np.float16
    assert manifest["config"]["views"] == 2 and manifest["metrics"]["n_train"] == len(plain)
    assert not np.allclose(views[0], plain, atol=1e-2) and not np.allclose(views[0], views[1], atol=1e-2)


@pytest.mark.slow
def test_views_do_not_depend_on_the_batch_size(views_workspace, tmp_path):
    """Augmentations are drawn per image from the view's seed: another batch size gives the same views."""
    shutil.copytree(views_workspace / "outputs/artifacts/encoders", tmp_path / "outputs/artifacts/encoders")
    sslfuse("cache", *SMOKE, "cache.views=2", "cache.batch_size=100", "hydra.run.dir=c", cwd=tmp_path)
    (_, first), (_, second) = stored_views(views_workspace), stored_views(tmp_path)
    np.testing.assert_allclose(first.astype(np.float32), second.astype(np.float32), atol=2e-2)


@pytest.mark.slow
def test_fuse_trains_on_views_and_reuses_the_cache(views_workspace):
    proc = sslfuse("fuse", *SMOKE, "fusion=concat", "cache.views=2", "hydra.run.dir=f", cwd=views_workspace)
    assert "concat[2 views](rotation)" in proc.stdout
    result = json.loads((views_workspace / "f/results.json").read_text())
    assert result["cached_views"] == 2
    again = sslfuse("cache", *SMOKE, "cache.views=2", "hydra.run.dir=c2", cwd=views_workspace)
    assert "2 views" in again.stdout and "(reused)" in again.stdout.splitlines()[-1]


@pytest.mark.slow
def test_fuse_without_cached_views_names_the_command(views_workspace):
    proc = sslfuse("fuse", *SMOKE, "fusion=concat", "cache.views=3", cwd=views_workspace, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert (
        "no 3 cached views" in proc.stderr
        and "sslfuse cache pretexts=[rotation] preset=smoke cache.views=3" in proc.stderr
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("cache.views=-1", "cache.views must be >= 0"),
        ("cache.views_max_shift=0.5", "cache.views_max_shift must be in [0, 0.5)"),
    ],
)
@pytest.mark.slow
def test_bad_view_options_are_refused_before_any_work(tmp_path, override, message):
    proc = sslfuse("cache", *SMOKE, override, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "outputs/artifacts/views").exists()


@pytest.mark.slow
def test_run_caches_views_and_fuses_on_them(tmp_path):
    proc = sslfuse("run", *SMOKE, "fusions=[concat]", "seeds=[0]", "cache.views=2", "hydra.run.dir=r", cwd=tmp_path)
    assert "2 views cached" in proc.stdout
    (result,) = [json.loads(p.read_text()) for p in (tmp_path / "r").rglob("results.json")]
    assert result["method"] == "concat[2 views](rotation)" and result["cached_views"] == 2
