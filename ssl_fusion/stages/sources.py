"""Where the features a head reads come from: sslfuse's own pretext encoders, encoders made elsewhere
(``+external.<name>`` keys or a file ``external/<name>.yaml``) and arrays made elsewhere (``+imported.<name>``).

Each kind of source says what it supports and how its features are checked, made and loaded; the stages loop over
the sources and never ask which kind one is. A new kind is a ``FeatureSource`` subclass here; one the config
declares by name (a ``Declared`` kind) is listed in ``DECLARED``, and its key needs a field in the stages' schemas.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Iterator

from omegaconf import DictConfig

from ssl_fusion.config import (
    REPLICA_SEED_STRIDE,
    CacheConfig,
    ProbeConfig,
    check_external,
    check_imported,
    check_names,
    check_seed,
    external_files,
    replica_of,
    replica_seed,
)
from ssl_fusion.data.features import FeatureSet
from ssl_fusion.data.imported import ImportedFeatures, load_imported
from ssl_fusion.models.external import ExternalEncoderConfig
from ssl_fusion.pretexts import PRETEXTS, PretextConfig
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages import user_overrides
from ssl_fusion.stages.caching import (
    encoder_conversion,
    ensure_external_features,
    ensure_features,
    ensure_views,
    pretrain_command,
    stored_encoder,
)
from ssl_fusion.stages.context import StageContext
from ssl_fusion.stages.pretrain import ensure_encoder, probe_summary
from ssl_fusion.stages.tracking import track_pretraining
from ssl_fusion.store.artifacts import (
    ENCODERS_KIND,
    FEATURES_KIND,
    VIEWS_KIND,
    artifact_exists,
    encoder_artifact,
    external_features_artifact,
    features_artifact,
    load_features,
    load_views,
    pretext_recipe,
    views_artifact,
)


class FeatureSource(ABC):
    """One named source of features. ``run`` calls ``check_views``, ``check`` then ``ensure``; ``sslfuse cache``
    calls ``check_views``, ``check_cacheable`` then ``cache``; ``fuse`` calls ``load``, which checks views itself."""

    has_views: ClassVar[bool] = False  # it can give features of ``cache.views`` augmented train images
    made_by_cache: ClassVar[bool] = True  # ``sslfuse cache`` makes its features: fuse's suggested command names it
    no_views: ClassVar[str] = ""  # without views: the refusal of ``cache.views``, with {name} and {verb}

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def check_views(self, cache: CacheConfig, verb: str) -> None:
        """Refuse ``cache.views`` for a source without views; ``verb``: what the user should do without them."""
        if cache.views and not self.has_views:
            raise UserError(f"cache.views={cache.views}: {self.no_views.format(name=self.name, verb=verb)}")

    def check(self, ctx: StageContext) -> None:
        """Refuse, before ``run`` does any work, what cannot run."""

    def check_cacheable(self, ctx: StageContext) -> None:
        """Refuse, before ``sslfuse cache`` does any work, what it cannot cache."""

    @abstractmethod
    def ensure(self, ctx: StageContext, cache: CacheConfig, probe: ProbeConfig) -> tuple[FeatureSet, str]:
        """Make what the store lacks (``run``); the features, and what was done in words."""

    def cache(self, ctx: StageContext, cache: CacheConfig) -> Iterator[str]:
        """Cache the features (``sslfuse cache``), a line for each artifact as it is reused or computed; none for a
        source that ``sslfuse cache`` does not make (``made_by_cache``)."""
        return iter(())

    @abstractmethod
    def load(self, ctx: StageContext, cache: CacheConfig, cache_command: str) -> FeatureSet:
        """The features (``fuse``); a UserError naming ``cache_command`` when they are not cached."""


class OwnPretext(FeatureSource):
    """An encoder sslfuse pretrains on a pretext task (``conf/pretext/<name>.yaml``), with augmented views on demand.
    Named ``<pretext>@<k>``, replica k of it: the same recipe pretrained with the seed encoder_seed +
    ``REPLICA_SEED_STRIDE`` k, stored as the encoder that ``sslfuse pretrain`` makes with that seed."""

    has_views = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.pretext, self.replica = replica_of(name)

    def context(self, ctx: StageContext) -> StageContext:
        """``ctx`` with this source's pretraining seed: the stage's, or a replica's."""
        if not self.replica:
            return ctx
        seed = replica_seed(ctx.seed, self.replica)
        check_seed(
            f"encoder_seed + {REPLICA_SEED_STRIDE} * {self.replica} (the seed of pretexts entry '{self.name}')", seed
        )
        return dataclasses.replace(ctx, seed=seed)

    def recipe(self, ctx: StageContext) -> PretextConfig:
        return pretext_recipe(self.pretext, ctx.overrides)

    def encoder_name(self, ctx: StageContext) -> str:
        return encoder_artifact(self.context(ctx), self.recipe(ctx), ctx.overrides.max_steps_per_epoch)

    def pretrain_command(self, ctx: StageContext) -> str:
        """The command that pretrains this source's encoder (``ctx``: the stage's): a replica's names its seed."""
        if not self.replica:
            return pretrain_command(self.pretext)
        extra = user_overrides(("pretexts", "cache", "pretext", "seed", "encoder_seed"))
        return " ".join(["sslfuse pretrain", f"pretext={self.pretext}", f"seed={self.context(ctx).seed}", *extra])

    def check(self, ctx: StageContext) -> None:
        """The pretext must be able to run on the pretraining data (and a replica's seed be in range)."""
        PRETEXTS.get(self.pretext).impl.check(self.recipe(ctx), self.context(ctx).pretraining)

    def check_cacheable(self, ctx: StageContext) -> None:
        """The encoder must be stored, and the downstream images convertible to its input."""
        own = self.context(ctx)
        encoder_conversion(own, stored_encoder(own, self.pretext, self.pretrain_command(ctx)))

    def ensure(self, ctx: StageContext, cache: CacheConfig, probe: ProbeConfig) -> tuple[FeatureSet, str]:
        own = self.context(ctx)
        encoder_name, manifest, reused = ensure_encoder(own.for_pretraining(), self.recipe(ctx), probe)
        if not reused:
            track_pretraining(ctx.tracker, ctx.store.folder(ENCODERS_KIND, encoder_name), manifest)
        _, _, cached = ensure_features(own, encoder_name, cache.batch_size)
        views = ""
        if cache.views:
            _, views_reused = ensure_views(own, encoder_name, cache)
            views = f", {cache.views} views {'reused' if views_reused else 'cached'}"
        done = (
            f"encoder {'reused' if reused else 'made'} ({probe_summary(manifest['metrics'])}), "
            f"features {'reused' if cached else 'cached'}{views}"
        )
        return self.load(ctx, cache, ""), done

    def cache(self, ctx: StageContext, cache: CacheConfig) -> Iterator[str]:
        own = self.context(ctx)
        encoder_name = self.encoder_name(ctx)  # stored: ``check_cacheable`` made sure
        name, _, reused = ensure_features(own, encoder_name, cache.batch_size, cache.num_workers)
        yield f"features {name} ({'reused' if reused else 'computed'}): {ctx.store.folder(FEATURES_KIND, name)}"
        if cache.views:
            name, reused = ensure_views(own, encoder_name, cache)
            folder = ctx.store.folder(VIEWS_KIND, name)
            yield f"{cache.views} views {name} ({'reused' if reused else 'computed'}): {folder}"

    def load(self, ctx: StageContext, cache: CacheConfig, cache_command: str) -> FeatureSet:
        encoder_name = self.encoder_name(ctx)
        name = features_artifact(ctx, encoder_name)
        if not artifact_exists(ctx.store, FEATURES_KIND, name):
            raise UserError(
                f"no cached features for pretext '{self.name}' in '{ctx.store.root}'; make them with: {cache_command}"
            )
        return with_views(ctx, load_features(ctx.store, name), encoder_name, cache, cache_command)


def with_views(
    ctx: StageContext,
    features: FeatureSet,
    encoder_name: str,
    cache: CacheConfig,
    cache_command: str,
) -> FeatureSet:
    """``features`` with the encoder's ``cache.views`` stored augmented views attached (unchanged when 0)."""
    if not cache.views:
        return features
    name = views_artifact(encoder_name, cache.views, cache.views_max_shift, ctx.fingerprints, ctx.dataset_cfg.name)
    if not artifact_exists(ctx.store, VIEWS_KIND, name):
        raise UserError(
            f"no {cache.views} cached views for '{encoder_name}' in '{ctx.store.root}'; make them with: {cache_command}"
        )
    return dataclasses.replace(features, train_views=load_views(ctx.store, name))


class Declared(FeatureSource):
    """A kind of source the config declares by name under its own ``key`` (``+<key>.<name>...``)."""

    key: ClassVar[str]

    @classmethod
    @abstractmethod
    def declared(cls, node: Any) -> dict[str, FeatureSource]:
        """The sources of this kind under ``node`` (the config's ``key``), each checked."""

    @classmethod
    def listed(cls, node: Any, names: list[str]) -> dict[str, FeatureSource]:
        """The sources of this kind for a stage whose ``pretexts`` has the undeclared entries ``names``: those
        ``declared`` under ``node``; a kind that files may declare also those of ``names`` it finds a file of."""
        return cls.declared(node)


class External(Declared):
    """An encoder made elsewhere (``+external.<name>.arch=...`` or ``external/<name>.yaml``), run on the converted
    images (under torchrun by every rank on its shard, as sslfuse's own encoders are)."""

    key = "external"
    no_views = "the external encoder '{name}' has no augmented views; {verb} it without cache.views"

    def __init__(self, name: str, cfg: ExternalEncoderConfig) -> None:
        super().__init__(name)
        self.cfg = cfg

    @classmethod
    def declared(cls, node: Any) -> dict[str, FeatureSource]:
        return cls.listed(node, [])

    @classmethod
    def listed(cls, node: Any, names: list[str]) -> dict[str, FeatureSource]:
        """Those under ``node`` and those of ``names`` that a file ``external/<name>.yaml`` declares."""
        return {name: cls(name, cfg) for name, cfg in check_external(node, PRETEXTS, names).items()}

    def ensure(self, ctx: StageContext, cache: CacheConfig, probe: ProbeConfig) -> tuple[FeatureSet, str]:
        artifact, _, cached = ensure_external_features(ctx, self.name, self.cfg, cache.batch_size)
        return load_features(ctx.store, artifact), f"external encoder, features {'reused' if cached else 'cached'}"

    def cache(self, ctx: StageContext, cache: CacheConfig) -> Iterator[str]:
        name, _, reused = ensure_external_features(ctx, self.name, self.cfg, cache.batch_size, cache.num_workers)
        yield f"features {name} ({'reused' if reused else 'computed'}): {ctx.store.folder(FEATURES_KIND, name)}"

    def load(self, ctx: StageContext, cache: CacheConfig, cache_command: str) -> FeatureSet:
        self.check_views(cache, "fuse")
        artifact = external_features_artifact(ctx, self.name, self.cfg)
        if not artifact_exists(ctx.store, FEATURES_KIND, artifact):
            raise UserError(
                f"no cached features for external encoder '{self.name}' in '{ctx.store.root}'; "
                f"make them with: {cache_command}"
            )
        return load_features(ctx.store, artifact)


class Imported(Declared):
    """Arrays made elsewhere (``+imported.<name>.train=... .test=...``), read afresh and checked by every stage."""

    key = "imported"
    made_by_cache = False
    no_views = "the imported features '{name}' have no augmented views; {verb} them without cache.views"

    def __init__(self, name: str, spec: ImportedFeatures) -> None:
        super().__init__(name)
        self.spec = spec

    @classmethod
    def declared(cls, node: Any) -> dict[str, FeatureSource]:
        return {name: cls(name, spec) for name, spec in check_imported(node, PRETEXTS).items()}

    def ensure(self, ctx: StageContext, cache: CacheConfig, probe: ProbeConfig) -> tuple[FeatureSet, str]:
        features = self.load(ctx, cache, "")
        return features, f"imported ({features.train.shape[1]} features)"

    def load(self, ctx: StageContext, cache: CacheConfig, cache_command: str) -> FeatureSet:
        self.check_views(cache, "fuse")
        return load_imported(self.name, self.spec, ctx.data.train_labels, ctx.data.test_labels)


# The kinds a config declares by name, in the order their keys are checked: a name two kinds declare is the first's.
DECLARED: tuple[type[Declared], ...] = (Imported, External)


def declared_sources(cfg: DictConfig) -> dict[str, FeatureSource]:
    """The sources declared under the config's keys of ``DECLARED`` (a stage without a key declares none of it), and
    the entries of its ``pretexts`` that a file declares."""
    declared: dict[str, FeatureSource] = {}
    for kind in DECLARED:
        names = [name for name in cfg.pretexts if name not in declared]
        for name, source in kind.listed(cfg.get(kind.key) or {}, names).items():
            declared.setdefault(name, source)
    return declared


def sources_named(
    names: Iterable[str],
    declared: dict[str, FeatureSource],
    key: str = "pretexts",
) -> list[FeatureSource]:
    """The sources of ``names``, checked (``check_names`` under ``key``): a declared one, else sslfuse's own pretext
    or a replica of it."""
    checked = check_names(key, list(names), PRETEXTS, declared, replicas=True, files=external_files())
    return [declared.get(name) or OwnPretext(name) for name in checked]


def feature_sources(cfg: DictConfig) -> list[FeatureSource]:
    """The sources of the config's ``pretexts``."""
    return sources_named(cfg.pretexts, declared_sources(cfg))
