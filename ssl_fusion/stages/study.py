"""``sslfuse study study=<name>``: a declared study (``conf/study/<name>.yaml``, ``docs/studies.md``).

1. The study file is checked (``declaration.check_study``), and every run job it implies is composed, before any
   work: a bad file is refused in one line.
2. The claims and their sha256 are recorded in ``<studies_dir>/<name>/claims.json`` before the first fuse; once
   results exist, changed claims need ``amend="<reason>"`` (``declaration.declare``).
3. Whatever results the study lacks are made by ``sslfuse run -m`` jobs through the configured Hydra launcher (the
   study's own ``hydra/launcher`` and ``hydra.launcher.*`` overrides), one job per encoder seed and input set, each
   pretraining and caching only what the store lacks. Results live in the study's folder, one folder per cell and
   input set (dataset, pretraining data, regime, and a hash of the settings that change results, the set's pretexts
   among them), so that a rerun finds them and runs nothing.
4. ``verdicts.md`` and ``verdicts.csv`` (``report.verdicts``) are written in this run's folder.
"""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ssl_fusion.cli import one_line
from ssl_fusion.evaluation.result import FuseResult
from ssl_fusion.report.results import load_result, results_frame
from ssl_fusion.report.verdicts import judge, shown, write_verdicts
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.tracking import Tracker
from ssl_fusion.stages import run_dir, stage_app
from ssl_fusion.stages.declaration import (
    Cell,
    Inputs,
    Plan,
    StudyRegime,
    StudyStage,
    check_study,
    declare,
    regime_of,
)
from ssl_fusion.stages.tracking import stage_tracker
from ssl_fusion.store.files import content_key

log = logging.getLogger("sslfuse")
ConfigStore.instance().store(name="study_schema", node=StudyStage)
LAUNCHER_KEYS = ("hydra/launcher", "hydra.launcher.")  # the study's hydra overrides its run jobs get too


def hydra_value(value: Any) -> str:
    """``value`` written in Hydra's override grammar: strings quoted, lists and dicts in brackets and braces."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def cell_overrides(plan: Plan, cell: Cell, inputs: Inputs) -> list[str]:
    """The overrides of every run job of ``cell`` over ``inputs``, as the study declares them (the settings its
    results depend on): the keys of its external encoders too, those a file declares among them, so that a changed
    file gets a folder of its own. ``++`` sets the dicts, which are empty in the run's config."""
    study, regime = plan.study, cell.regime
    return [
        f"dataset={cell.dataset}",
        *([f"pretrain_dataset={cell.pretrain_dataset}"] if cell.pretrain_dataset else []),
        f"encoder={study.encoder}",
        f"pretexts={hydra_value(inputs.pretexts)}",
        f"labels.fraction={hydra_value(regime.fraction)}",
        f"labels.per_class={hydra_value(regime.per_class)}",
        f"labels.indices_file={hydra_value(regime.indices_file)}",
        *([f"++external={hydra_value(study.external)}"] if study.external else []),
        *([f"++imported={hydra_value(study.imported)}"] if study.imported else []),
        *([f"head_overrides={hydra_value(study.head_overrides)}"] if study.head_overrides else []),
        *study.overrides,
    ]


def cell_folder(root: Path, plan: Plan, cell: Cell, inputs: Inputs) -> Path:
    """``<study>/results/<dataset>[-on-<pretraining data>]/<regime>/<hash of the cell's overrides>``: settings that
    change results get a folder of their own, so that a changed setting never reuses a result made without it (each
    input set, with pretexts of its own, too)."""
    data = cell.dataset + (f"-on-{cell.pretrain_dataset}" if cell.pretrain_dataset else "")
    regime = re.sub(r"[^A-Za-z0-9._-]+", "_", cell.regime_name.replace("%", "pct").replace("/class", "-per-class"))
    return root / "results" / data / regime / content_key({"overrides": cell_overrides(plan, cell, inputs)})[:8]


def seed_folder(folder: Path, encoder_seed: int) -> Path:
    return folder / f"encoder_seed{encoder_seed}"


def kept_results(folder: Path, plan: Plan, inputs: Inputs) -> list[tuple[Path, FuseResult]]:
    """The results under ``folder`` that the study declares on ``inputs``, each with its file: scored on test, with a
    declared label seed, by a method over the pretexts it runs on (results of heads or seeds the study no longer
    lists are left out)."""
    seeds = set(plan.study.label_seeds)
    found = [(path, load_result(path)) for path in sorted(folder.rglob("results.json"))] if folder.is_dir() else []
    return [
        (path, result)
        for path, result in found
        if result.split == "test"
        and result.labels.get("seed") in seeds
        and inputs.expects(result.title, result.pretexts)
    ]


def missing_runs(plan: Plan, inputs: Inputs, folder: Path) -> tuple[list[str], list[int]]:
    """The fusions and label seeds one encoder seed's folder of ``inputs`` lacks a result of (every variant, every
    seed)."""
    done = {
        (result.title, frozenset(result.pretexts), result.labels["seed"])
        for _, result in kept_results(folder, plan, inputs)
    }
    missing = {
        (fusion, seed)
        for fusion, keys in inputs.expected.items()
        for seed in plan.study.label_seeds
        if any((title, pretexts, seed) not in done for title, pretexts in keys)
    }
    fusions = [fusion for fusion in inputs.fusions if any(fusion == lacking for lacking, _ in missing)]
    seeds = [seed for seed in plan.study.label_seeds if any((fusion, seed) in missing for fusion in fusions)]
    return fusions, seeds


@dataclass(frozen=True)
class Job:
    """One ``sslfuse run -m`` the study still needs: ``fusions`` on ``label_seeds`` over one input set of a cell, for
    the encoder seeds that lack the same."""

    cell: Cell
    inputs: Inputs
    fusions: tuple[str, ...]
    label_seeds: tuple[int, ...]
    encoder_seeds: tuple[int, ...]


def planned_jobs(root: Path, plan: Plan) -> list[Job]:
    """The run jobs the study still needs, per cell and input set: the encoder seeds that lack the same fusions and
    seeds share one sweep."""
    jobs = []
    for cell in plan.cells:
        for inputs in plan.inputs:
            folder = cell_folder(root, plan, cell, inputs)
            lacking: dict[tuple[tuple[str, ...], tuple[int, ...]], list[int]] = defaultdict(list)
            for encoder_seed in plan.study.encoder_seeds:
                fusions, seeds = missing_runs(plan, inputs, seed_folder(folder, encoder_seed))
                if fusions:
                    lacking[tuple(fusions), tuple(seeds)].append(encoder_seed)
            jobs += [Job(cell, inputs, *key, tuple(encoder_seeds)) for key, encoder_seeds in lacking.items()]
    return jobs


def job_arguments(root: Path, plan: Plan, job: Job, extra: list[str]) -> list[str]:
    """``sslfuse run -m`` arguments of one job: the cell's overrides, its fusions and seeds, a sweep over its
    encoder seeds into the folder of its cell and input set, then ``extra`` (the stage's ``run`` list and launcher
    overrides)."""
    return [
        "run",
        "-m",
        *cell_overrides(plan, job.cell, job.inputs),
        f"fusions={hydra_value(job.fusions)}",
        f"seeds={hydra_value(job.label_seeds)}",
        f"encoder_seed={','.join(map(str, job.encoder_seeds))}",
        f"hydra.sweep.dir={hydra_value(str(cell_folder(root, plan, job.cell, job.inputs)))}",
        "hydra.sweep.subdir=encoder_seed${encoder_seed}",
        *extra,
    ]


def check_jobs(plan: Plan, extra: list[str]) -> None:
    """Compose every cell's run config as its jobs will, so that an override the run stage refuses (a misspelled
    key in ``overrides``, an unknown dataset option) is refused before any work, in one line; and a study scored on
    another split than test."""
    for cell, inputs in itertools.product(plan.cells, plan.inputs):
        overrides = [
            *cell_overrides(plan, cell, inputs),
            f"fusions={hydra_value(inputs.fusions)}",
            f"seeds={hydra_value(plan.study.label_seeds)}",
            f"encoder_seed={plan.study.encoder_seeds[0]}",
            *(o for o in extra if not o.lstrip("+~").startswith("hydra")),
        ]
        try:
            composed = compose(config_name="run", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            cause = f" ({one_line(str(err.__cause__))})" if err.__cause__ else ""
            raise UserError(
                f"study: the run jobs of {cell.dataset} at {cell.regime_name} do not compose: "
                f"{one_line(str(err))}{cause}"
            ) from None
        if composed.evaluation.split != "test":
            raise UserError(
                f"study: evaluation.split={composed.evaluation.split}: a study's claims are judged on the "
                "test split; choose designs on dev with sslfuse run before declaring them"
            )


def launcher_overrides() -> list[str]:
    """This run's overrides of the Hydra launcher (``hydra/launcher=local``, ``hydra.launcher.n_jobs=2``), which the
    study's run jobs are launched with."""
    return [o for o in HydraConfig.get().overrides.hydra if o.lstrip("+~").startswith(LAUNCHER_KEYS)]


def tracking_overrides(cfg: DictConfig, tracker: Tracker) -> list[str]:
    """The ``tracking`` overrides that make a run job's runs nest under the study's run (none: no tracking)."""
    nesting = tracker.nesting()
    if not nesting:
        return []
    return [
        f"tracking={cfg.tracking.name}",
        *(f"tracking.{key}={hydra_value(value)}" for key, value in nesting.items()),
    ]


def launch(arguments: list[str]) -> None:
    """``sslfuse run`` with ``arguments`` in a process of its own (its output goes to this one's)."""
    sys.stdout.flush()
    returned = subprocess.run([sys.executable, "-m", "ssl_fusion.cli", *arguments], check=False).returncode
    if returned != 0:
        raise UserError(
            f"study: 'sslfuse {' '.join(arguments)}' exited {returned} (its message is above); fix it and "
            "run the study again: it goes on from the results that exist"
        )


def regime_text(regime: StudyRegime) -> str:
    """``1%``, or ``1% on fashion_mnist`` for a regime that runs on some datasets only."""
    return regime_of(regime) + (f" on {' and '.join(regime.datasets)}" if regime.datasets else "")


def describe(plan: Plan) -> str:
    """The study's design in a sentence, for its verdict page."""
    study = plan.study
    pretrained = f", pretrained on {', '.join(study.pretrain_datasets)}" if study.pretrain_datasets else ""
    controls = f" (controls: {', '.join(study.controls)})" if study.controls else ""
    sets = "".join(
        f"; input set {inputs.name}: {', '.join(inputs.fusions)} over {', '.join(inputs.pretexts)}"
        for inputs in plan.inputs[1:]
    )
    head_options = f"; every head with {', '.join(study.head_overrides)}" if study.head_overrides else ""
    return (
        f"Design: {', '.join(study.datasets)}{pretrained}; encoder {study.encoder}; pretexts "
        f"{', '.join(study.pretexts)}{controls}; {len(study.encoder_seeds)} encoder seeds "
        f"({', '.join(map(str, study.encoder_seeds))}) × {len(study.label_seeds)} label seeds "
        f"({', '.join(map(str, study.label_seeds))}); regimes {', '.join(map(regime_text, study.regimes))}; "
        f"methods {', '.join(plan.main.fusions)}{sets}{head_options}."
    )


def study_results(root: Path, plan: Plan) -> pd.DataFrame:
    """Every declared result of every cell, input set and encoder seed, as the report's frame (each row with its
    folder, where its kept predictions are read from)."""
    found = [
        item
        for cell, inputs, encoder_seed in itertools.product(plan.cells, plan.inputs, plan.study.encoder_seeds)
        for item in kept_results(seed_folder(cell_folder(root, plan, cell, inputs), encoder_seed), plan, inputs)
    ]
    if not found:
        return pd.DataFrame()
    return results_frame([result for _, result in found], [str(path.parent) for path, _ in found])


def count_results(root: Path) -> int:
    """How many results the study's folder holds, declared or not: any of them makes a change of claims an
    amendment."""
    return sum(1 for _ in (root / "results").rglob("results.json")) if (root / "results").is_dir() else 0


def print_verdicts(lines: Iterable[dict[str, Any]]) -> None:
    for row in lines:
        print(
            f"  claim {row['#']}: {row['claim']}: estimate {row['estimate']}, Holm 95% interval "
            f"{row['Holm 95% interval']}, P(improvement) {row['P(improvement)']} -> {row['verdict']}"
        )


@stage_app("study")
def main(cfg: DictConfig) -> None:
    name = HydraConfig.get().runtime.choices["study"]
    tracker = stage_tracker(cfg)
    plan = check_study(cfg.study)
    extra = [*cfg.run, *launcher_overrides()]
    check_jobs(plan, extra)
    root = Path(cfg.studies_dir) / name
    record = declare(root, plan.study.claims, count_results(root), cfg.amend, plan.conditions)
    print(
        f"study {name}: {len(plan.claims)} claim(s) declared in {root / 'claims.json'} "
        f"(sha256 {record['versions'][-1]['sha256'][:12]}, version {len(record['versions'])})"
    )
    jobs = planned_jobs(root, plan)
    if not jobs:
        print(f"study {name}: every result exists in {root / 'results'}; nothing to run")
    version = record["versions"][-1]
    with tracker.parent(f"study {name}", "study", {"study": name, "claims_sha256": version["sha256"]}):
        nested = tracking_overrides(cfg, tracker)
        for number, job in enumerate(jobs, start=1):
            print(
                f"study {name}: job {number} of {len(jobs)}: {job.cell.dataset}, {job.cell.regime_name}, input set "
                f"{job.inputs.name}, encoder seeds {list(job.encoder_seeds)}, label seeds {list(job.label_seeds)}, "
                f"{', '.join(job.fusions)}"
            )
            launch(job_arguments(root, plan, job, [*extra, *nested]))
        results = study_results(root, plan)
        if results.empty:
            raise UserError(f"study {name}: no results in {root / 'results'} after its runs")
        verdicts = judge(results, plan.claims)
        md_path, csv_path = write_verdicts(Path(run_dir()), name, verdicts, record["versions"], describe(plan))
        tracker.log_artifacts([md_path, csv_path])
    print(f"study {name}: verdicts ({len(results)} results; claims Holm-adjusted as one family):")
    print_verdicts(shown(verdicts).to_dict("records"))
    print(f"verdicts written to {md_path} and {csv_path}; all results: sslfuse report {root / 'results'}")
