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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from ssl_fusion.config import (
    LabelsConfig,
    check_entries,
    check_imported,
    check_names,
    check_seed,
    external_declarations,
    external_files,
    split_entry,
)
from ssl_fusion.data.datasets import DATASETS
from ssl_fusion.data.splits import regime_name
from ssl_fusion.fusion.protocol import head_title
from ssl_fusion.models.encoders import ENCODERS
from ssl_fusion.pretexts import PRETEXTS
from ssl_fusion.report.paired import BEST_SINGLE, Side
from ssl_fusion.report.verdicts import EQUIVALENT, INPUT_KEYS, MAIN, Claim, ClaimConfig
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
class InputSetConfig(Checked):
    """An input set besides the study's main one (its ``pretexts``): the pretexts its heads fuse, with the study's
    controls, and the heads that run on it."""

    section: ClassVar[str] = "input set"
    pretexts: List[str] = MISSING  # pretexts, or names of the study's external encoders or imported features
    heads: List[str] = MISSING  # options of conf/fusion, each fusing the set's pretexts in one head

    def rules(self) -> dict[str, Rule]:
        return {key: DISTINCT for key in ("pretexts", "heads")}


@dataclass
class StudyRegime(LabelsConfig):
    """A label regime of a study: the ``labels`` keys of ``run``, and the datasets it runs on (empty: every one)."""

    datasets: List[str] = field(default_factory=list)


@dataclass
class StudyConfig(Checked):
    """What a study runs and what it claims (``conf/study/<name>.yaml``)."""

    section: ClassVar[str] = "study"
    datasets: List[str] = MISSING  # options of conf/dataset: the downstream data
    pretrain_datasets: List[str] = field(default_factory=list)  # options of conf/dataset; empty: each dataset itself
    encoder: str = "small_cnn"  # an option of conf/encoder
    pretexts: List[str] = MISSING  # pretexts, or names of the ``external`` encoders or ``imported`` features
    controls: List[str] = field(default_factory=list)  # control pretexts (random, noise) every head fuses as well
    # <name>: {arch: ..., checkpoint: ...}, as in run; a name in pretexts that external/<name>.yaml declares needs none
    external: Dict[str, Any] = field(default_factory=dict)
    imported: Dict[str, Any] = field(default_factory=dict)  # <name>: {train: <file>, test: <file>}, as in run
    encoder_seeds: List[int] = MISSING  # pretraining runs
    label_seeds: List[int] = MISSING  # labeled subsets, the same for every encoder seed (crossed)
    regimes: List[StudyRegime] = MISSING  # e.g. [{fraction: 0.01}, {per_class: 5, datasets: [digits]}]
    heads: List[str] = MISSING  # the methods the claims are about (options of conf/fusion)
    references: List[str] = field(default_factory=list)  # options of conf/fusion, or best-single
    claims: List[ClaimConfig] = MISSING
    overrides: List[str] = field(default_factory=list)  # more overrides of every run job, e.g. [preset=smoke]
    input_sets: Dict[str, InputSetConfig] = field(default_factory=dict)  # <name>: {pretexts, heads}, besides main
    head_overrides: List[str] = field(default_factory=list)  # options of every head of every set: [fusion.screen=false]

    def rules(self) -> dict[str, Rule]:
        return {key: DISTINCT for key in ("datasets", "pretexts", "encoder_seeds", "label_seeds", "heads")} | {
            "regimes": Rule(lambda regimes: len(regimes) > 0, "a non-empty list of label regimes", []),
            "claims": Rule(lambda claims: len(claims) > 0, "a non-empty list of claims", []),
        }


@dataclass
class StudyStage:
    """``sslfuse study study=<name>``: run what the study lacks, then judge its claims."""

    study: StudyConfig = MISSING
    tracking: Any = MISSING  # conf/tracking: the study is a parent run of its run jobs' runs
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
class Inputs:
    """One input set of a checked study: its name, what its run jobs fuse (its pretexts, then the controls), the
    methods that run on it, and per method (title, pretexts) of every result it gives per label seed."""

    name: str
    pretexts: list[str]
    fusions: list[str]
    expected: dict[str, set[tuple[str, frozenset[str]]]]

    def expects(self, result_title: str, pretexts: list[str]) -> bool:
        """Whether a result of this title over these pretexts is one of the set's."""
        return any((result_title, frozenset(pretexts)) in keys for keys in self.expected.values())


@dataclass
class Plan:
    """A checked study: what runs (each input set's ``fusions`` over its ``pretexts`` in each cell; ``main`` first),
    its claims with the methods named as the results name them (``select`` as ``select[by=val]``) and the sides
    they pair, and what the claims record keeps besides the claims (``conditions``)."""

    study: StudyConfig
    inputs: list[Inputs]
    cells: list[Cell]
    claims: list[Claim]
    conditions: dict[str, Any]

    @property
    def main(self) -> Inputs:
        return self.inputs[0]


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
    for name, item in node.input_sets.items():
        try:
            OmegaConf.to_object(item)
        except UserError as err:
            raise UserError(f"study.input_sets.{name}.{str(err).removeprefix('input set.')}") from None
    return OmegaConf.to_object(node)


def method_names(
    fusions: list[str], pretexts: list[str], head_overrides: list[str]
) -> dict[str, tuple[str, frozenset[str]]]:
    """Each way a claim may name a method that runs -> (its name in the results, the pretexts it reads): a method
    with one variant by its option's name or its title (``select``, ``select[by=val]``, with the options
    ``head_overrides`` change: ``attention[screen=False]``), every variant by its label (``single(rotation)``)."""
    names = {}
    for fusion in fusions:
        variants = planned_heads([fusion], pretexts, head_overrides)
        for config, used in variants:
            title = head_title(config, METHODS)
            read = frozenset() if lookup_method(config.name).needs_images else frozenset(used)
            names[f"{title}({'+'.join(used)})"] = (f"{title}({'+'.join(used)})", read)
            if len(variants) == 1:
                names[title] = names[fusion] = (title, read)
    return names


def expected_results(
    fusions: list[str], pretexts: list[str], head_overrides: list[str]
) -> dict[str, set[tuple[str, frozenset[str]]]]:
    """Per method of ``fusions``, (title, pretexts) of every result it gives over ``pretexts`` per label seed: the
    title tells ``attention`` from ``attention[scorer=uniform]``."""
    return {
        fusion: {
            (head_title(config, METHODS), frozenset() if lookup_method(config.name).needs_images else frozenset(used))
            for config, used in planned_heads([fusion], pretexts, head_overrides)
        }
        for fusion in fusions
    }


def check_sides(key: str, claim: ClaimConfig, names: dict[str, dict[str, tuple[str, frozenset[str]]]]) -> tuple:
    """The claim's two sides as (input set, name in the results, pretexts read); a one-line UserError for an unknown
    input set, or a method or reference that never runs on its side's set."""
    for field_name in INPUT_KEYS:
        inputs = getattr(claim, field_name)
        if inputs is not None and inputs not in names:
            raise UserError(
                f"{key}.{field_name}: '{inputs}' is not an input set of this study; sets: {', '.join(names)}"
            )
    mine, theirs = claim.inputs or MAIN, claim.reference_inputs or MAIN
    where = "in this study" if len(names) == 1 else f"on input set {mine}"
    runs = ", ".join(sorted({name for name, _ in names[mine].values()}))
    if claim.method not in names[mine]:
        raise UserError(f"{key}.method: '{claim.method}' never runs {where}; methods that run: {runs}")
    if claim.reference == BEST_SINGLE:
        if MAIN != mine or MAIN != theirs:
            raise UserError(f"{key}: best-single is chosen among the single heads over the main set; claim it on main")
        return (mine, *names[mine][claim.method]), (theirs, BEST_SINGLE, frozenset())
    references = {name for name, _ in names[theirs].values() if not name.endswith(")")}
    if claim.reference not in names[theirs] or names[theirs][claim.reference][0].endswith(")"):
        where = "in this study" if len(names) == 1 else f"on input set {theirs}"
        choices = ", ".join([*sorted(references), *([BEST_SINGLE] if theirs == MAIN else [])])
        raise UserError(
            f"{key}.reference: '{claim.reference}' never runs {where} as a reference; references that run: {choices}"
        )
    return (mine, *names[mine][claim.method]), (theirs, *names[theirs][claim.reference])


def check_claims(
    claims: list[ClaimConfig],
    names: dict[str, dict[str, tuple[str, frozenset[str]]]],
    regimes: dict[str, list[str]],
    datasets: list[str],
) -> list[Claim]:
    """The claims with their methods named as the results name them, and the sides they pair; a one-line UserError
    for a claim whose method or reference never runs on its input set (``check_sides``), whose regime the study has
    not or runs on other datasets (``regimes``: each regime's name -> the datasets it runs on), or that cannot be
    paired: methods over different inputs pair only where the claim names both sets."""
    normalised, seen = [], {}
    for index, claim in enumerate(claims):
        key = f"study.claims[{index}]"
        (mine, method, read), (theirs, reference, their_read) = check_sides(key, claim, names)
        if claim.reference == BEST_SINGLE and (
            not read or "single" not in {name.partition("(")[0] for name, _ in names[MAIN].values()}
        ):
            raise UserError(f"{key}.reference: best-single needs single heads over the method's pretexts")
        explicit = claim.inputs is not None and claim.reference_inputs is not None
        if reference != BEST_SINGLE and their_read != read and not explicit:
            raise UserError(
                f"{key}: {method} reads {'+'.join(sorted(read)) or 'images'}, {reference} reads "
                f"{'+'.join(sorted(their_read)) or 'images'}; only methods over the same inputs pair, unless the "
                "claim names both sides' input sets (inputs, reference_inputs)"
            )
        if (method, mine) == (reference, theirs):
            raise UserError(f"{key}: method and reference are both {method}" + (f" on {mine}" if explicit else ""))
        if claim.regime not in regimes:
            raise UserError(
                f"{key}.regime: '{claim.regime}' is not a regime of this study; regimes: {', '.join(regimes)}"
            )
        unknown = [name for name in claim.datasets if name not in datasets]
        if unknown or len(set(claim.datasets)) != len(claim.datasets):
            raise UserError(
                f"{key}.datasets: {', '.join(unknown) or 'a repeat'} in {claim.datasets}; give distinct datasets of "
                f"this study ({', '.join(datasets)}), or none for all"
            )
        outside = [name for name in claim.datasets or datasets if name not in regimes[claim.regime]]
        if outside:
            raise UserError(
                f"{key}: {claim.regime} does not run on {outside[0]} (study.regimes gives it "
                f"{', '.join(regimes[claim.regime])}); judge the claim on those datasets (claims.datasets)"
            )
        if claim.direction == EQUIVALENT and claim.margin <= 0:
            raise UserError(
                f"{key}.margin must be > 0 for direction equivalent (|difference| < margin), got {claim.margin}"
            )
        config = dataclasses.replace(claim, method=method, reference=reference)
        shown = " against ".join(config.sides())
        judged = {(claim.regime, dataset) for dataset in claim.datasets or datasets}
        if judged & seen.get(shown, set()):
            raise UserError(f"{key}: {shown} at {claim.regime} is claimed twice on a dataset; claim it once")
        seen[shown] = seen.get(shown, set()) | judged
        normalised.append(Claim(config, Side(method, mine, read), Side(reference, theirs, their_read)))
    return normalised


def check_input_set(
    name: str,
    config: InputSetConfig,
    study: StudyConfig,
    sources: list[str],
    taken: list[Inputs],
    files: list[str],
) -> Inputs:
    """An input set besides main, checked: a plain name, known pretexts (``sources``: the declared ones; ``files``: the
    external encoder files, listed when a name is unknown) that are not controls, heads that each fuse
    the set's pretexts in one head (not once per pretext, not over the images), and inputs no other set has."""
    key = f"study.input_sets.{name}"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name == MAIN:
        raise UserError(
            f"{key}: a set is named by a word of letters, digits, _ and - that is not '{MAIN}' (the study's pretexts)"
        )
    check_names(f"{key}.pretexts", config.pretexts, PRETEXTS, sources, replicas=True, files=files)
    both = sorted(set(config.pretexts) & set(study.controls))
    if both:
        raise UserError(f"{key}.pretexts: {both[0]} is a control, which every set fuses already; list it once")
    check_entries(f"{key}.heads", config.heads, METHODS)
    fused = [*config.pretexts, *study.controls]
    for head in config.heads:
        if (
            lookup_method(split_entry(head)[0]).needs_images
            or len(planned_heads([head], fused, study.head_overrides)) != 1
        ):
            raise UserError(
                f"{key}.heads: {head} does not fuse the set's pretexts in one head (it runs once per pretext or "
                "reads the images); it runs on main only"
            )
    for other in taken:
        if set(other.pretexts) == set(fused):
            raise UserError(
                f"{key}.pretexts: {'+'.join(fused)} are the inputs of {other.name} already; a set needs inputs of "
                "its own"
            )
    return Inputs(name, fused, list(config.heads), expected_results(config.heads, fused, study.head_overrides))


def check_study(node: Any) -> Plan:
    """Every check of a study file that needs no data, in one line naming the key: names of datasets, encoder,
    pretexts, methods; seeds; regimes; input sets (``check_input_set``); head overrides; claims (``check_claims``)."""
    study = typed_study(node)
    for key in ("datasets", "pretrain_datasets"):
        if getattr(study, key):
            check_names(f"study.{key}", getattr(study, key), DATASETS)
    check_names("study.encoder", [study.encoder], ENCODERS)
    imported = check_imported(node.imported, PRETEXTS)
    listed = [*study.pretexts, *(name for config in study.input_sets.values() for name in config.pretexts)]
    external = external_declarations(node.external, PRETEXTS, [name for name in listed if name not in imported])
    study = dataclasses.replace(study, external=external)  # the run jobs get each file's keys: they need no search path
    files = external_files()
    pretexts = check_names(
        "study.pretexts", study.pretexts, PRETEXTS, [*imported, *external], replicas=True, files=files
    )
    if study.controls:
        check_names("study.controls", study.controls, PRETEXTS, replicas=True)
        both = sorted(set(study.controls) & set(pretexts))
        if both:
            raise UserError(f"study.controls: {both[0]} is also in study.pretexts; list it once")
    for key in ("encoder_seeds", "label_seeds"):
        for seed in getattr(study, key):
            check_seed(f"study.{key}", seed)
    references = [name for name in study.references if name != BEST_SINGLE]
    check_entries("study.heads", study.heads, METHODS)
    if references:
        check_entries("study.references", references, METHODS)
    both = sorted(set(study.heads) & set(references))
    if both:
        raise UserError(f"study.references: {both[0]} is also a head; list it once")
    fusions = [*study.heads, *references]
    if BEST_SINGLE in study.references and "single" not in fusions:
        fusions.append("single")
    try:
        planned_heads(fusions, [*pretexts, *study.controls], study.head_overrides)
    except UserError as err:
        raise UserError(f"study.{err}") from None
    fused = [*pretexts, *study.controls]
    inputs = [Inputs(MAIN, fused, fusions, expected_results(fusions, fused, study.head_overrides))]
    for name, config in study.input_sets.items():
        inputs.append(check_input_set(name, config, study, [*imported, *external], inputs, files))
    regimes = [regime_of(regime) for regime in study.regimes]
    if len(set(regimes)) != len(regimes):
        raise UserError(f"study.regimes: {', '.join(regimes)} names a regime twice")
    for index, regime in enumerate(study.regimes):
        unknown = [name for name in regime.datasets if name not in study.datasets]
        if unknown:
            raise UserError(
                f"study.regimes[{index}].datasets: {unknown[0]} is not a dataset of this study "
                f"({', '.join(study.datasets)}); give some of them, or none for all"
            )
    names = {item.name: method_names(item.fusions, item.pretexts, study.head_overrides) for item in inputs}
    runs_on = {name: regime.datasets or list(study.datasets) for name, regime in zip(regimes, study.regimes)}
    claims = check_claims(study.claims, names, runs_on, list(study.datasets))
    cells = [
        Cell(dataset, pretrain, regime)
        for dataset in study.datasets
        for pretrain in (study.pretrain_datasets or [None])
        for regime in study.regimes
        if not regime.datasets or dataset in regime.datasets
    ]
    return Plan(study, inputs, cells, claims, conditions(study, inputs))


def conditions(study: StudyConfig, inputs: list[Inputs]) -> dict[str, Any]:
    """What the claims record keeps and hashes besides the claims, where the study has it: the pretexts of every
    input set a claim names, and the head overrides. The same claim over other inputs, or with the screen off, is
    another claim; a study without either hashes as before they existed."""
    named = {name for claim in study.claims for name in (claim.inputs, claim.reference_inputs) if name}
    sets = {item.name: item.pretexts for item in inputs if item.name in named}
    return {
        **({"input_sets": sets} if sets else {}),
        **({"head_overrides": list(study.head_overrides)} if study.head_overrides else {}),
    }


def claims_hash(declared: Any) -> str:
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


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


def declare(
    folder: Path,
    claims: list[ClaimConfig],
    results: int,
    amend: Optional[str],
    conditions: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Record the claims, with the ``conditions`` they hold under (``declaration.conditions``), in
    ``folder/claims.json`` (before any result exists, they simply replace the record), or check them against the last
    version recorded; with ``results`` present, different claims are refused unless ``amend`` gives the reason, which
    adds a version. Returns the record."""
    path = folder / CLAIMS_FILE
    declared = [claim.declared() for claim in claims]
    digest = claims_hash({"claims": declared, **conditions} if conditions else declared)
    record = read_record(path)
    if record is not None and record["versions"][-1]["sha256"] == digest:
        return record
    version = {
        "sha256": digest,
        "declared": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "claims": declared,
        **(conditions or {}),
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
