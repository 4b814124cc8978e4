"""A declared study (``conf/study/<name>.yaml``, ``docs/studies.md``): its typed schema, the checks that refuse a bad
file before any work, the plan of what runs, and the record of its claims.

The record (``claims.json`` in the study's folder) keeps every version of the claims with its sha256, oldest first.
It is written before the study's first fuse; once results exist, claims that differ from the last version are
refused unless the change is declared an amendment (``amend="<reason>"``), which adds a version.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from ssl_fusion.config import (
    LabelsConfig,
    as_plain,
    check_external,
    check_imported,
    check_names,
    check_seed,
)
from ssl_fusion.data.datasets import DATASETS
from ssl_fusion.data.splits import regime_name
from ssl_fusion.models.encoders import ENCODERS
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.report.paired import BEST_SINGLE
from ssl_fusion.report.verdicts import EQUIVALENT, ClaimConfig
from ssl_fusion.runtime.checks import Checked, Rule
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.methods import METHODS, lookup_method
from ssl_fusion.stages.run import planned_heads
from ssl_fusion.store.files import atomic_write_json

CLAIMS_FILE = "claims.json"
DISTINCT = Rule(
    lambda values: len(values) > 0 and len(set(values)) == len(values), "a non-empty list without repeats", []
)


@dataclass
class StudyConfig(Checked):
    """What a study runs and what it claims (``conf/study/<name>.yaml``)."""

    section: ClassVar[str] = "study"
    datasets: List[str] = MISSING  # options of conf/dataset: the downstream data
    pretrain_datasets: List[str] = field(default_factory=list)  # options of conf/dataset; empty: each dataset itself
    encoder: str = "small_cnn"  # an option of conf/encoder
    pretexts: List[str] = MISSING  # pretexts, or names of the ``external`` encoders or ``imported`` features
    controls: List[str] = field(default_factory=list)  # control pretexts (random, noise) every head fuses as well
    external: Dict[str, Any] = field(default_factory=dict)  # <name>: {arch: ..., checkpoint: ...}, as in run
    imported: Dict[str, Any] = field(default_factory=dict)  # <name>: {train: <file>, test: <file>}, as in run
    encoder_seeds: List[int] = MISSING  # pretraining runs
    label_seeds: List[int] = MISSING  # labeled subsets, the same for every encoder seed (crossed)
    regimes: List[LabelsConfig] = MISSING  # e.g. [{fraction: 0.01}, {per_class: 5}]
    heads: List[str] = MISSING  # the methods the claims are about (options of conf/fusion)
    references: List[str] = field(default_factory=list)  # options of conf/fusion, or best-single
    claims: List[ClaimConfig] = MISSING
    overrides: List[str] = field(default_factory=list)  # more overrides of every run job, e.g. [preset=smoke]

    def rules(self) -> dict[str, Rule]:
        return {key: DISTINCT for key in ("datasets", "pretexts", "encoder_seeds", "label_seeds", "heads")} | {
            "regimes": Rule(lambda regimes: len(regimes) > 0, "a non-empty list of label regimes", []),
            "claims": Rule(lambda claims: len(claims) > 0, "a non-empty list of claims", []),
        }


@dataclass
class StudyStage:
    """``sslfuse study study=<name>``: run what the study lacks, then judge its claims."""

    study: StudyConfig = MISSING
    amend: Optional[str] = None  # the reason for changing the claims after results exist
    studies_dir: str = "outputs/studies"  # each study's results and claims live in <studies_dir>/<name>/
    run: List[str] = field(default_factory=list)  # overrides of every run job that do not change results (device=...)


@dataclass(frozen=True)
class Cell:
    """The results of one run job's settings: a dataset, the data its encoders are pretrained on, a label regime."""

    dataset: str
    pretrain_dataset: Optional[str]
    regime: LabelsConfig

    @property
    def regime_name(self) -> str:
        return regime_of(self.regime)


def regime_of(labels: LabelsConfig) -> str:
    """A regime's name as results and tables give it: ``1%``, ``5/class``, an indices file's name."""
    return regime_name(labels.fraction, labels.per_class, labels.indices_file)


@dataclass
class Plan:
    """A checked study: what runs (``fusions`` over ``pretexts`` in each cell) and its claims with the methods named
    as the results name them (``select`` as ``select[by=val]``)."""

    study: StudyConfig
    fusions: list[str]
    pretexts: list[str]
    expected: set[tuple[str, frozenset[str]]]  # (family, pretexts) of every result a cell holds per label seed
    cells: list[Cell]
    claims: list[ClaimConfig]


def typed_study(node: Any) -> StudyConfig:
    """The study node as a typed config: a missing key, a claim or a regime out of range in one line naming it."""
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        raise UserError(
            f"{missing[0]} is missing; a study declares datasets, pretexts, encoder_seeds, "
            "label_seeds, regimes, heads and claims (docs/studies.md)"
        )
    for key, part in (("claims", "claim"), ("regimes", "labels")):
        for index, item in enumerate(node[key]):
            try:
                OmegaConf.to_object(item)
            except UserError as err:
                raise UserError(f"study.{key}[{index}]: {str(err).removeprefix(part + '.')}") from None
    return OmegaConf.to_object(node)


def method_names(fusions: list[str], pretexts: list[str]) -> dict[str, tuple[str, frozenset[str]]]:
    """Each way a claim may name a method that runs -> (its name in the results, the pretexts it reads): a method
    with one variant by its option's name or its title (``select``, ``select[by=val]``), every variant by its label
    (``single(rotation)``)."""
    names = {}
    for fusion in fusions:
        variants = planned_heads([fusion], pretexts)
        for config, used in variants:
            method = lookup_method(config.name)
            title = method.title(config)
            read = frozenset() if method.needs_images else frozenset(used)
            names[f"{title}({'+'.join(used)})"] = (f"{title}({'+'.join(used)})", read)
            if len(variants) == 1:
                names[title] = names[fusion] = (title, read)
    return names


def check_claims(
    claims: list[ClaimConfig], names: dict[str, tuple[str, frozenset[str]]], regimes: list[str]
) -> list[ClaimConfig]:
    """The claims with their methods named as the results name them; a one-line UserError for a claim whose
    method or reference never runs, whose regime the study has not, or that cannot be paired."""
    runs = ", ".join(sorted({name for name, _ in names.values()}))
    references = ", ".join([*sorted({name for name, _ in names.values() if not name.endswith(")")}), BEST_SINGLE])
    normalised, seen = [], set()
    for index, claim in enumerate(claims):
        key = f"study.claims[{index}]"
        if claim.method not in names:
            raise UserError(f"{key}.method: '{claim.method}' never runs in this study; methods that run: {runs}")
        method, read = names[claim.method]
        if claim.reference == BEST_SINGLE:
            if not read or "single" not in {name.partition("(")[0] for name, _ in names.values()}:
                raise UserError(f"{key}.reference: best-single needs single heads over the method's pretexts")
            reference = BEST_SINGLE
        elif claim.reference not in names or names[claim.reference][0].endswith(")"):
            raise UserError(
                f"{key}.reference: '{claim.reference}' never runs in this study as a reference; "
                f"references that run: {references}"
            )
        else:
            reference, theirs = names[claim.reference]
            if theirs != read:
                raise UserError(
                    f"{key}: {method} reads {'+'.join(sorted(read)) or 'images'}, {reference} reads "
                    f"{'+'.join(sorted(theirs)) or 'images'}; only methods over the same inputs pair"
                )
        if method == reference:
            raise UserError(f"{key}: method and reference are both {method}")
        if claim.regime not in regimes:
            raise UserError(
                f"{key}.regime: '{claim.regime}' is not a regime of this study; regimes: {', '.join(regimes)}"
            )
        if claim.direction == EQUIVALENT and claim.margin <= 0:
            raise UserError(
                f"{key}.margin must be > 0 for direction equivalent (|difference| < margin), got {claim.margin}"
            )
        if (method, reference, claim.regime) in seen:
            raise UserError(f"{key}: {method} against {reference} at {claim.regime} is claimed twice; claim it once")
        seen.add((method, reference, claim.regime))
        normalised.append(dataclasses.replace(claim, method=method, reference=reference))
    return normalised


def check_study(node: Any) -> Plan:
    """Every check of a study file that needs no data, in one line naming the key: names of datasets, encoder,
    pretexts, methods; seeds; regimes; claims (``check_claims``)."""
    study = typed_study(node)
    for key in ("datasets", "pretrain_datasets"):
        if getattr(study, key):
            check_names(f"study.{key}", getattr(study, key), DATASETS)
    check_names("study.encoder", [study.encoder], ENCODERS)
    imported, external = check_imported(node.imported, PRETEXTS), check_external(node.external, PRETEXTS)
    pretexts = check_names("study.pretexts", study.pretexts, PRETEXTS, [*imported, *external], replicas=True)
    if study.controls:
        check_names("study.controls", study.controls, PRETEXTS, replicas=True)
        both = sorted(set(study.controls) & set(pretexts))
        if both:
            raise UserError(f"study.controls: {both[0]} is also in study.pretexts; list it once")
    for key in ("encoder_seeds", "label_seeds"):
        for seed in getattr(study, key):
            check_seed(f"study.{key}", seed)
    references = [name for name in study.references if name != BEST_SINGLE]
    check_names("study.heads", study.heads, METHODS)
    if references:
        check_names("study.references", references, METHODS)
    both = sorted(set(study.heads) & set(references))
    if both:
        raise UserError(f"study.references: {both[0]} is also a head; list it once")
    fusions = [*study.heads, *references]
    if BEST_SINGLE in study.references and "single" not in fusions:
        fusions.append("single")
    fused = [*pretexts, *study.controls]
    regimes = [regime_of(regime) for regime in study.regimes]
    if len(set(regimes)) != len(regimes):
        raise UserError(f"study.regimes: {', '.join(regimes)} names a regime twice")
    claims = check_claims(study.claims, method_names(fusions, fused), regimes)
    expected = {
        (config.name, frozenset() if lookup_method(config.name).needs_images else frozenset(used))
        for config, used in planned_heads(fusions, fused)
    }
    cells = [
        Cell(dataset, pretrain, regime)
        for dataset in study.datasets
        for pretrain in (study.pretrain_datasets or [None])
        for regime in study.regimes
    ]
    return Plan(study, fusions, fused, expected, cells, claims)


def claims_hash(claims: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).hexdigest()


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """The claims record in ``path``; None when there is none; a UserError naming it when it cannot be read."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not record.get("versions"):
            raise ValueError("no versions")
        return record
    except (OSError, ValueError) as err:
        raise UserError(
            f"the claims record '{path}' cannot be read ({err}); restore it, or delete it and give "
            'amend="<reason>" to declare the claims again'
        ) from None


def declare(folder: Path, claims: list[ClaimConfig], results: int, amend: Optional[str]) -> dict[str, Any]:
    """Record the claims in ``folder/claims.json`` (before any result exists, they simply replace the record), or
    check them against the last version recorded; with ``results`` present, different claims are refused unless
    ``amend`` gives the reason, which adds a version. Returns the record."""
    path = folder / CLAIMS_FILE
    declared = [as_plain(claim) for claim in claims]
    digest = claims_hash(declared)
    record = read_record(path)
    if record is not None and record["versions"][-1]["sha256"] == digest:
        return record
    version = {
        "sha256": digest,
        "declared": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "claims": declared,
        "amendment": None,
        "results_before": results,
    }
    if results and amend is None:
        was = (
            f"the claims declared in '{path}' (sha256 {record['versions'][-1]['sha256'][:12]})"
            if record
            else f"no declared claims ('{path}' is missing)"
        )
        raise UserError(
            f"the study's claims (sha256 {digest[:12]}) differ from {was} and {results} result(s) exist; "
            'changing claims after results is an amendment: run again with amend="<reason>"'
        )
    if results:
        if not str(amend).strip():
            raise UserError('amend needs a reason: amend="<why the claims change>"')
        version["amendment"] = str(amend)
        record = {"versions": [*(record["versions"] if record else []), version]}
    else:
        record = {"versions": [version]}
    atomic_write_json(path, record)
    return record
