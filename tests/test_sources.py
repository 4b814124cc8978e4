"""Feature sources: every kind gives ``fuse`` (``load``) the features ``run`` made and loaded (``ensure``), and the
stages loop over sources without asking their kind, so a kind declared outside them works through them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from conftest import sslfuse, synthetic_context
from omegaconf import OmegaConf

from ssl_fusion.config import CacheConfig, ProbeConfig
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.splits import EvaluationConfig
from ssl_fusion.fusion.single import SingleConfig
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import sources
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.fuse import cached_features, fused_sources
from ssl_fusion.stages.run import check_run, prepare_features

PROBE = ProbeConfig(max_train=32, max_test=16)


def small_context(store) -> StageContext:
    return synthetic_context(store, 48, 16)


def config(tmp_path, **extra: Any):
    """A stage config over a source of each kind: the own ``random`` pretext, an external resnet18, imported arrays."""
    arrays = {split: tmp_path / f"{split}.npy" for split in ("train", "test")}
    for (split, path), rows in zip(arrays.items(), (48, 16)):
        np.save(path, np.random.default_rng(rows).normal(size=(rows, 6)).astype(np.float32))
    return OmegaConf.create(
        {
            "pretexts": ["random", "r18", "clip"],
            "external": {"r18": {"arch": "torchvision:resnet18", "image_size": 16}},
            "imported": {"clip": {split: str(path) for split, path in arrays.items()}},
            **extra,
        }
    )


def same_features(a: FeatureSet, b: FeatureSet) -> bool:
    views = (a.train_views is None and b.train_views is None) or torch.equal(a.train_views, b.train_views)
    splits = ("train", "test", "train_labels", "test_labels")
    return views and a.uses_labels == b.uses_labels and all(torch.equal(getattr(a, k), getattr(b, k)) for k in splits)


def test_the_config_gives_one_source_of_each_kind_in_the_order_of_pretexts(tmp_path):
    listed = sources.feature_sources(config(tmp_path))
    assert [(type(s), s.name) for s in listed] == [
        (sources.OwnPretext, "random"),
        (sources.External, "r18"),
        (sources.Imported, "clip"),
    ]
    with pytest.raises(UserError, match="unknown pretext 'cip' in pretexts; .*; imported: clip, r18"):
        sources.feature_sources(config(tmp_path, pretexts=["random", "cip"]))


@pytest.mark.parametrize("views", [0, 2])
def test_every_kind_loads_for_fuse_the_features_run_made(tmp_path, views):
    """What run makes and fuses on (``ensure``) is what fuse then finds (``load``), views included, and a second run
    makes nothing again; before it, fuse refuses a source that ``sslfuse cache`` makes naming that command. A source
    without views refuses them."""
    ctx, cache = small_context(tmp_path / "store"), CacheConfig(batch_size=16, views=views, num_workers=0)
    for source in sources.feature_sources(config(tmp_path)):
        if views and not source.has_views:
            with pytest.raises(UserError, match=f"cache.views={views}: .*'{source.name}'.* no augmented views"):
                source.check_views(cache, "fuse")
            continue
        if source.made_by_cache:
            with pytest.raises(UserError, match=f"no cached .*'{source.name}'.*; make them with: sslfuse cache"):
                source.load(ctx, cache, "sslfuse cache")
        made, done = source.ensure(ctx, cache, PROBE)
        assert same_features(source.load(ctx, cache, "sslfuse cache"), made)
        again, done_again = source.ensure(ctx, cache, PROBE)
        assert same_features(again, made) and "made" not in done_again and "cached" not in done_again, done_again
        assert (made.train_views is not None) == bool(views)
        assert made.train.shape[0] == 48 and made.test.shape[0] == 16


class Seeded(sources.Declared):
    """A fourth kind, declared here and nowhere in the stages: ``+seeded.<name>.dim=<d>``, seeded Gaussian features."""

    key = "seeded"
    made_by_cache = False
    no_views = "the seeded features '{name}' have no augmented views; {verb} them without cache.views"

    def __init__(self, name: str, dim: int) -> None:
        super().__init__(name)
        self.dim, self.checked = dim, False

    @classmethod
    def declared(cls, node: Any) -> dict[str, sources.FeatureSource]:
        return {name: cls(name, int(spec["dim"])) for name, spec in node.items()}

    def check(self, ctx: StageContext) -> None:
        self.checked = True

    def ensure(self, ctx: StageContext, cache: CacheConfig, probe: ProbeConfig) -> tuple[FeatureSet, str]:
        return self.load(ctx, cache, ""), f"seeded ({self.dim} features)"

    def load(self, ctx: StageContext, cache: CacheConfig, cache_command: str) -> FeatureSet:
        generator = torch.Generator().manual_seed(self.dim)
        train, test = (
            torch.randn(len(labels), self.dim, generator=generator)
            for labels in (ctx.data.train_labels, ctx.data.test_labels)
        )
        return FeatureSet(train, test, ctx.data.train_labels, ctx.data.test_labels)


def test_a_kind_declared_outside_the_stages_works_through_run_and_fuse(tmp_path, monkeypatch, capsys):
    """Registered in ``DECLARED`` alone, a new kind is built from its config key, checked and made by run's functions,
    loaded by fuse's, and picked by a ``single`` head, beside an own pretext."""
    monkeypatch.setattr(sources, "DECLARED", (*sources.DECLARED, Seeded))
    cfg = OmegaConf.create({"pretexts": ["random", "noise4"], "seeded": {"noise4": {"dim": 4}}, "seeds": [0]})
    listed = sources.feature_sources(cfg)
    assert [type(s) for s in listed] == [sources.OwnPretext, Seeded]
    ctx, cache = small_context(tmp_path / "store"), CacheConfig(batch_size=16, num_workers=0)
    check_run(ctx, cfg, [], None, listed, EvaluationConfig())
    assert listed[1].checked
    made = prepare_features(ctx, PROBE, cache, listed)
    assert "           noise4: seeded (4 features)" in capsys.readouterr().out.splitlines()
    loaded = cached_features(ctx, listed, cache, "sslfuse cache pretexts=[random]")
    assert list(loaded) == ["random", "noise4"] and all(same_features(loaded[n], made[n]) for n in made)
    (single,) = fused_sources(
        SingleConfig(name="single", pretext="noise4"), ["random", "noise4"], sources.declared_sources(cfg)
    )
    assert isinstance(single, Seeded) and not single.made_by_cache


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "declared", "message"),
    [
        (
            "run",
            ["+imported.clip.train=a.npy", "+imported.clip.test=b.npy"],
            "cache.views=2: the imported features 'clip' have no augmented views; fuse them without cache.views",
        ),
        (
            "cache",
            ["+external.clip.arch=torchvision:resnet18"],
            "cache.views=2: the external encoder 'clip' has no augmented views; cache it without cache.views",
        ),
    ],
)
def test_views_of_a_source_without_them_are_refused_before_any_work(tmp_path, stage, declared, message):
    """Asked for beside an own pretext listed first, they are refused in one line before it is pretrained or cached."""
    proc = sslfuse(
        stage, "preset=smoke", "pretexts=[rotation,clip]", *declared, "cache.views=2", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip() == f"sslfuse {stage}: error: {message}"
    assert not (tmp_path / "outputs/artifacts").exists()
