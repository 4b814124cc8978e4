"""Typed schemas of the stage configs, registered in Hydra's ConfigStore.

The option groups (``dataset``, ``encoder``, ``pretext``, ``fusion``, ``tracking``) are typed ``Any`` here because
each option has a dataclass of its own; the stages check them with ``Registry.typed_config``
before any work starts.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, List, Optional

import torch
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from ssl_fusion.data.imported import ImportedFeatures
from ssl_fusion.data.splits import EvaluationConfig, labeled_subset, subset_fields
from ssl_fusion.models.external import ExternalEncoderConfig, external_config
from ssl_fusion.runtime.checks import Checked, Rule, above, at_least, one_of, optional, within
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.registry import Registry
from ssl_fusion.runtime.search_path import group_options, load_group_option

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXTERNAL_GROUP = "external"  # <group>/<name>.yaml on Hydra's search path declares the external encoder <name>
DEFAULT_PRETEXTS = ["rotation", "simclr", "random"]
# Seeds are scaled before they seed a generator (e.g. ``seed * 100003 * 4099`` per epoch and rank in pretraining):
# within this bound every derived seed stays inside torch's 64-bit range.
MAX_SEED = 2**32 - 1
SEED_KEYS = ("seed", "encoder_seed", "seeds", "encoder_seeds")
# ``<pretext>@<k>`` in ``pretexts``: replica k of the pretext, its recipe pretrained again with the seed
# encoder_seed + REPLICA_SEED_STRIDE * k (a stride above any seed list's length, so replicas and encoder_seeds differ)
REPLICA_SEED_STRIDE = 1000
REPLICA_MARK = "@"
# How a recipe's learning rate follows a global batch B other than its own batch b: x sqrt(B / b), the rule for Adam
# (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms"; the trainer's AdamW), x B / b
# (Goyal et al. 2017, for SGD), or unchanged
LR_SCALING = {"sqrt": math.sqrt, "linear": lambda ratio: ratio, "none": lambda ratio: 1.0}


@dataclass
class TrainOverrides(Checked):
    """Stage-wide overrides of every pretext's own recipe (``null`` keeps the recipe)."""

    section: ClassVar[str] = "train"
    epochs: Optional[int] = None
    epochs_scale: Optional[float] = None  # multiplies each recipe's epochs (preset=full uses it)
    batch_size: Optional[int] = None  # the global batch: split over torchrun's processes
    # the batch of each torchrun process (null: none; the global batch is train.batch_size or the recipe's): the
    # global batch is this times the number of processes, so more processes train an epoch in fewer steps
    batch_size_per_device: Optional[int] = None
    lr_scaling: str = "sqrt"  # how pretext.lr follows a global batch other than pretext.batch_size (LR_SCALING)
    max_steps_per_epoch: Optional[int] = None
    num_threads: Optional[int] = None
    # DataLoader processes that decode an image folder's batches while pretraining, kept across epochs (0: the stage's
    # own process; null: the CPUs shared among torchrun's processes on the machine, at most 8)
    num_workers: Optional[int] = None
    checkpoint_every_minutes: Optional[float] = 5.0  # also checkpoint within an epoch (0 or null: at epoch ends only)
    checkpoint_every_steps: Optional[int] = None  # also checkpoint every this many steps (null: by time only)
    # torch.compile the encoder's forward for pretraining; in the encoder's key, since compiled kernels round otherwise
    compile: bool = False

    def rules(self) -> dict[str, Rule]:
        positive = (
            "epochs",
            "epochs_scale",
            "batch_size",
            "max_steps_per_epoch",
            "num_threads",
            "checkpoint_every_steps",
        )
        return {
            **{key: optional(above(0)) for key in positive},
            "batch_size_per_device": Rule(
                lambda value: value is None or (self.batch_size is None and value > 0),
                "> 0 with train.batch_size null (give one of the two), or null",
                0,
            ),
            "lr_scaling": one_of(LR_SCALING),
            "num_workers": optional(at_least(0, " (0: no worker processes; null: one per CPU, at most 8)")),
            "checkpoint_every_minutes": optional(at_least(0, " (0 or null: at epoch ends only)")),
        }

    def global_batch(self, recipe_batch: int, processes: int) -> int:
        """The batch of one optimiser step over all ``processes``: ``batch_size_per_device`` times their number where
        set, else ``batch_size``, else the recipe's."""
        if self.batch_size_per_device is not None:
            return self.batch_size_per_device * processes
        return recipe_batch if self.batch_size is None else self.batch_size

    def scaled_lr(self, recipe_lr: float, recipe_batch: int, global_batch: int) -> float:
        """The recipe's learning rate (meant for its own batch) for ``global_batch``, by the rule ``lr_scaling``."""
        return recipe_lr * LR_SCALING[self.lr_scaling](global_batch / recipe_batch)


@dataclass
class ProbeConfig(Checked):
    """kNN and linear probes run on every encoder that pretraining stores (written to its manifest), and during its
    pretraining after every ``every_epochs`` epochs (into the manifest's history and curve)."""

    section: ClassVar[str] = "probe"
    k: int = 20
    linear_l2: float = 1e-3
    max_train: Optional[int] = 10000  # null: the whole split
    max_test: Optional[int] = 2000
    every_epochs: int = 0  # 0: only once pretrained

    def rules(self) -> dict[str, Rule]:
        return {
            "k": at_least(1),
            "linear_l2": at_least(0),
            "max_train": optional(above(0)),
            "max_test": optional(above(0)),
            "every_epochs": at_least(0, " (0: probe only once pretrained)"),
        }


@dataclass
class CacheConfig(Checked):
    section: ClassVar[str] = "cache"
    batch_size: int = 1024
    views: int = 0  # > 0: also cache features of this many augmented copies of every train image (heads train on them)
    views_max_shift: float = 0.1  # each view: a random shift by up to this fraction of the size; half of them mirrored
    # DataLoader processes that decode an image folder's batches (0: the stage's own process; null: the CPUs shared
    # among torchrun's processes on the machine, at most 8)
    num_workers: Optional[int] = None

    def rules(self) -> dict[str, Rule]:
        return {
            "batch_size": above(0),
            "views": at_least(0, " (0: no augmented views)"),
            "views_max_shift": within(0, 0.5, "[)"),
            "num_workers": optional(at_least(0, " (0: no worker processes; null: one per CPU, at most 8)")),
        }


@dataclass
class LabelsConfig(Checked):
    """Which labeled training samples the fusion head sees: ``indices_file`` wins when set, then ``per_class``."""

    section: ClassVar[str] = "labels"
    fraction: Optional[float] = 0.01
    per_class: Optional[int] = None
    indices_file: Optional[str] = None  # a published split: one training index per line, or a JSON list

    def rules(self) -> dict[str, Rule]:
        """``per_class`` at most the smallest class: checked with the labels (``labeled_subset``)."""
        return {"fraction": optional(within(0, 1, "(]")), "per_class": optional(at_least(1))}

    def subset(self, train_labels: torch.Tensor, seed: int) -> torch.Tensor:
        """The labeled training indices for ``seed``."""
        return labeled_subset(train_labels, self.fraction, self.per_class, self.indices_file, seed)

    def fields(self, labeled: torch.Tensor, seed: int, train_labels: torch.Tensor) -> dict[str, Any]:
        """The fields of a result that name the labeled subset (of ``train_labels``)."""
        return subset_fields(self.fraction, self.per_class, labeled, seed, train_labels, self.indices_file)


@dataclass
class CommonConfig:
    dataset: Any = MISSING
    encoder: Any = MISSING
    tracking: Any = MISSING  # conf/tracking: none, or mlflow (ssl_fusion/runtime/tracking.py)
    artifacts_dir: str = "outputs/artifacts"
    data_dir: Optional[str] = None  # the downstream dataset's folder when dataset.data_dir is unset; only read
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0  # pretrain: the pretraining seed; fuse: the label-subset and head seed
    deterministic: bool = False  # torch.use_deterministic_algorithms: the same encoder for the same seed
    # the data sslfuse's own encoders are pretrained on: a dataset's name, or a config such as
    # {name:fashion_mnist,data_dir:<folder>} (read from its own data_dir, else outputs/data); None: dataset
    pretrain_dataset: Optional[Any] = None
    train: TrainOverrides = field(default_factory=TrainOverrides)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class PretrainStage(CommonConfig):
    pretext: Any = MISSING


@dataclass
class UsesEncoders(CommonConfig):
    """Stages that read stored encoders: ``encoder_seed`` says which pretraining seed made them."""

    encoder_seed: int = 0


@dataclass
class CacheStage(UsesEncoders):
    pretexts: List[str] = field(default_factory=lambda: list(DEFAULT_PRETEXTS))
    external: Dict[str, Any] = field(default_factory=dict)  # +external.<name>.arch=...: encoders made elsewhere
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class FuseStage(UsesEncoders):
    pretexts: List[str] = field(default_factory=lambda: list(DEFAULT_PRETEXTS))
    imported: Dict[str, Any] = field(default_factory=dict)  # +imported.<name>.train=/.test=: features made elsewhere
    external: Dict[str, Any] = field(default_factory=dict)  # +external.<name>.arch=...: encoders made elsewhere
    fusion: Any = MISSING
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)  # cache.views: train on that many cached views
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig
    )  # split=dev: score on held-out training images


@dataclass
class RunStage(UsesEncoders):
    """pretrain what is missing -> cache what is missing -> fuse each method and seed -> table."""

    pretexts: List[str] = field(default_factory=lambda: list(DEFAULT_PRETEXTS))
    imported: Dict[str, Any] = field(default_factory=dict)  # +imported.<name>.train=/.test=: features made elsewhere
    external: Dict[str, Any] = field(default_factory=dict)  # +external.<name>.arch=...: encoders made elsewhere
    fusions: List[str] = field(default_factory=lambda: ["attention", "concat", "select", "single"])
    head_overrides: List[str] = field(default_factory=list)  # options of every head, e.g. ['fusion.screen=false']
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    encoder_seeds: List[int] = field(
        default_factory=list
    )  # pretraining seeds to fuse each label seed with; empty: [encoder_seed]
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    evaluation: EvaluationConfig = field(
        default_factory=EvaluationConfig
    )  # split=dev: score on held-out training images


def register_schemas() -> None:
    store = ConfigStore.instance()
    for name, node in [
        ("pretrain_schema", PretrainStage),
        ("cache_schema", CacheStage),
        ("fuse_schema", FuseStage),
        ("run_schema", RunStage),
    ]:
        store.store(name=name, node=node)


def check_seed(key: str, seed: Any) -> None:
    """Refuse a seed that is not an integer within ``MAX_SEED`` of zero, in one line naming ``key``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or abs(int(seed)) > MAX_SEED:
        raise UserError(f"{key} must be an integer in [-{MAX_SEED}, {MAX_SEED}], got {seed!r}")


def check_seeds(cfg: Any) -> None:
    """Check every seed a stage config holds (``seed``, ``encoder_seed`` and the lists ``seeds``, ``encoder_seeds``)."""
    for key in SEED_KEYS:
        value = cfg.get(key)
        seeds = list(value) if OmegaConf.is_list(value) else [] if value is None else [value]
        for seed in seeds:
            check_seed(key, seed)


def load_option(registry: Registry, name: str, options: Optional[dict[str, Any]] = None) -> Any:
    """An option of a group as written in ``conf/<group>/<name>.yaml`` (typed), outside Hydra's composition, with
    ``options`` replacing some of its values.

    Stages that take a list of names (``pretexts=[a,b]``, ``fusions=[...]``) use each one's YAML as is.
    """
    registry.get(name)
    path = CONF_DIR / registry.kind / f"{name}.yaml"
    node = OmegaConf.load(path) if path.is_file() else OmegaConf.create({"name": name})
    for key, value in (options or {}).items():
        if key == "name" or key not in node:
            raise UserError(f"{registry.kind} {name}: '{key}' is not an option of it; options: {', '.join(node)}")
        node[key] = value
    return registry.typed_config(node, key=f"{registry.kind} {name}")


ENTRY = re.compile(r"(?P<name>[A-Za-z0-9_]+)(?:\[(?P<options>[^\[\]]*)\])?")


def split_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """``attention[scorer=uniform,pretext_dropout=0.5]`` -> (``attention``, its options): a method with changed
    options, written as the tables title it. Values are read as YAML (``0.5``, ``false``, ``[0.1,1]``)."""
    match = ENTRY.fullmatch(entry.strip())
    if match is None:
        raise UserError(f"'{entry}': give a method as <name> or <name>[<option>=<value>,...]")
    options = {}
    for item in filter(None, (part.strip() for part in (match["options"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"'{entry}': '{item}' is not <option>=<value>")
        options[key.strip()] = yaml.safe_load(value)
    return match["name"], options


def check_entries(key: str, entries: list[str], registry: Registry) -> list[str]:
    """A non-empty list of distinct method entries (``split_entry``), each naming an option of ``registry`` with
    options it has and values its rules allow."""
    if not entries:
        check_names(key, [], registry)
    for entry in entries:
        check_names(key, [split_entry(entry)[0]], registry)
    repeated = sorted({entry for entry in entries if entries.count(entry) > 1})
    if repeated:
        raise UserError(f"{key} lists {', '.join(repeated)} more than once")
    for entry in entries:
        try:
            load_entry(registry, entry)
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
    return list(entries)


def load_entry(registry: Registry, entry: str) -> Any:
    """The typed option an entry names (``split_entry``): its YAML with the entry's options."""
    name, options = split_entry(entry)
    return load_option(registry, name, options)


def replica_of(name: str) -> tuple[str, int]:
    """Pretext and replica of a ``pretexts`` entry: ``simclr@2`` -> (simclr, 2), ``simclr`` -> (simclr, 0)."""
    pretext, _, replica = name.partition(REPLICA_MARK)
    return pretext, int(replica) if replica else 0


def replica_seed(encoder_seed: int, replica: int) -> int:
    """The pretraining seed of replica ``replica`` (0: the pretext itself) of encoders of ``encoder_seed``."""
    return encoder_seed + REPLICA_SEED_STRIDE * replica


def check_replica(key: str, name: str, registry: Registry, also: list[str]) -> None:
    """Refuse, in one line naming ``key``, an entry ``<base>@<k>`` that is no replica of one of ``registry``'s options
    with k a positive integer (written without leading zeros): a name in ``also`` (made elsewhere) has no pretraining
    seed to vary."""
    base, _, replica = name.partition(REPLICA_MARK)
    allowed = (
        f"a replica is <{registry.kind}>@<k>, k a positive integer, of a {registry.kind} "
        f"({', '.join(registry.names())}), pretrained with seed encoder_seed + {REPLICA_SEED_STRIDE} k"
    )
    if base in also:
        raise UserError(f"{key}: '{name}' replicates '{base}', made elsewhere with no pretraining seed; {allowed}")
    if base not in registry.names() or not replica.isdigit() or replica != str(int(replica)) or int(replica) < 1:
        raise UserError(f"{key}: '{name}' is not a replica; {allowed}")


def check_names(
    key: str,
    names: list[str],
    registry: Registry,
    also: Iterable[str] = (),
    replicas: bool = False,
    files: Iterable[str] = (),
) -> list[str]:
    """A non-empty list of distinct names, each an option of ``registry`` or one of ``also`` (names the user gave), or
    with ``replicas`` a replica ``<option>@<k>`` of an option (``check_replica``). An unknown name is refused listing
    the options, ``also`` and the external encoder ``files`` found (``external_files``)."""
    if not names:
        raise UserError(f"{key} is empty; give at least one of: {', '.join(registry.names())}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{key} lists {', '.join(repeated)} more than once")
    also, files = list(also), list(files)
    for name in names:
        if replicas and REPLICA_MARK in name and name not in also:
            check_replica(key, name, registry, also)
        elif name not in also and name not in registry.names():
            imported = f"; imported: {', '.join(also)}" if also else ""
            found = f"; external files ({EXTERNAL_GROUP}/<name>.yaml): {', '.join(files)}" if files else ""
            raise UserError(
                f"unknown {registry.kind} '{name}' in {key}; valid {registry.kind}s: "
                f"{', '.join(registry.names())}{imported}{found}"
            )
    return list(names)


def external_files() -> list[str]:
    """The names of the external encoders declared by files ``external/<name>.yaml`` on the running stage's config
    search path: the package's ``conf/external/``, then the user's ``--config-dir`` and ``hydra.searchpath`` folders
    (Hydra takes a name from the first folder that has it)."""
    return group_options(EXTERNAL_GROUP)


def external_declarations(node: Any, registry: Registry, names: Iterable[str] = ()) -> dict[str, Any]:
    """The keys of each external encoder, as written (what a study passes to its run jobs), checked
    (``checked_externals``)."""
    return {name: spec for name, (spec, _) in checked_externals(node, registry, names).items()}


def checked_externals(
    node: Any, registry: Registry, names: Iterable[str] = ()
) -> dict[str, tuple[Any, ExternalEncoderConfig]]:
    """The keys of each external encoder as written, with its typed config from ``external_config`` (a one-line
    refusal naming the file and the key): those under ``node`` (``+external.<name>.<key>=...``), over the keys of the
    file ``external/<name>.yaml`` (``external_files``) where there is one, and those of ``names`` (``pretexts``
    entries) that only a file declares. A name both a built-in pretext and declared is refused in one line: it would
    be unclear which encoder it means."""
    given = {
        str(name): OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec for name, spec in node.items()
    }
    clashes = sorted(set(given) & set(registry.names()))
    if clashes:
        raise UserError(f"external.{clashes[0]}: the name of a built-in pretext; give the encoder another name")
    files = external_files()
    clashes = sorted(set(names) & set(files) & set(registry.names()))
    if clashes:
        raise UserError(
            f"'{clashes[0]}' is a built-in pretext and the name of the file {EXTERNAL_GROUP}/{clashes[0]}.yaml on the "
            "config search path; rename the file to use the encoder it declares"
        )
    declared = {}
    for name in [*given, *(name for name in names if name in files and name not in given)]:
        spec, where = given.get(name, {}), ""
        if name in files and isinstance(spec, dict):
            spec = {**load_group_option(EXTERNAL_GROUP, name), **spec}
            where = f"{EXTERNAL_GROUP}/{name}.yaml{f' with the external.{name} keys' if name in given else ''}: "
        try:
            declared[name] = spec, external_config(name, spec)
        except UserError as err:
            raise UserError(f"{where}{err}") from None
    return declared


def check_external(node: Any, registry: Registry, names: Iterable[str] = ()) -> dict[str, ExternalEncoderConfig]:
    """The external encoders (``checked_externals``: ``+external.<name>.arch=...`` keys, files
    ``external/<name>.yaml``) as typed configs, each under a name no built-in pretext has; a one-line UserError naming
    the key, and the file, otherwise."""
    return {name: cfg for name, (_, cfg) in checked_externals(node, registry, names).items()}


def check_imported(node: Any, registry: Registry) -> dict[str, ImportedFeatures]:
    """The ``imported`` feature sets (``+imported.<name>.train=... +imported.<name>.test=...``) as typed configs, each
    with both files and under a name no built-in pretext has; a one-line UserError naming the key otherwise."""
    imported = {}
    for name, spec in node.items():
        plain = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
        if not isinstance(plain, dict) or set(plain) != {"train", "test"}:
            raise UserError(
                f"imported.{name}: give exactly imported.{name}.train and imported.{name}.test, got {plain}"
            )
        imported[name] = ImportedFeatures(str(plain["train"]), str(plain["test"]))
    clashes = sorted(set(imported) & set(registry.names()))
    if clashes:
        raise UserError(
            f"imported.{clashes[0]}: the name of a built-in pretext; give the imported features another name"
        )
    return imported


def as_plain(config: Any) -> dict[str, Any]:
    """A typed config (dataclass instance) as a plain dict, for keys and manifests."""
    return OmegaConf.to_container(OmegaConf.structured(config))
