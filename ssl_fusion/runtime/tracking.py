"""Experiment tracking: runs recorded in a tracker besides their folders (``tracking=none``, ``tracking=mlflow``).

The stages talk to a ``Tracker``. ``tracking=none`` records nothing; ``tracking=mlflow`` writes MLflow runs through
``mlflow.MlflowClient``, imported only then, so that the ``tracking`` extra stays optional. A stage that makes several
runs opens a parent run (``Tracker.parent``) that the runs it logs nest under (``mlflow.parentRunId``). Beneath that,
every run nests under a base parent: ``tracking.parent`` when given (a study gives its run to its jobs, which run in
other processes), else, in a Hydra sweep, the sweep's parent run: the first job creates it, tagged with the sweep's
folder, and every job finds it by that tag, under a lock in that folder, so that jobs in other processes (the joblib
and SLURM launchers) nest under the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Iterable, Iterator, Optional
from urllib.parse import urlparse

from omegaconf import MISSING

from ssl_fusion.runtime.checks import Checked, Rule
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.registry import Registry

INSTALL = "pip install 'sslfuse[tracking]'"
SWEEP_TAG = "sslfuse.sweep_dir"  # the sweep parent's folder, by which the sweep's jobs find it
KIND_TAG = "sslfuse.kind"  # sweep, study, run, fuse, pretrain, report
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag of a nested run
LOCK_FILE = ".tracking.lock"  # in a sweep's folder: one job at a time looks for (or creates) the sweep's parent run
MAX_PARAMS, MAX_METRICS = 100, 1000  # the most of each that one MLflow log_batch call takes
NOT_BLANK = Rule(lambda value: bool(value.strip()), "a non-empty string", " ")


@dataclass
class TrackingConfig(Checked):
    """``tracking=none``: no tracker; every tracker's config derives from it."""

    section: ClassVar[str] = "tracking"
    name: str = MISSING


# The MLflow UI opens an experiment of this kind on its training runs, not on its GenAI traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


@dataclass
class MlflowConfig(TrackingConfig):
    """``tracking=mlflow``: runs in an MLflow tracking store."""

    # a tracking URI (http://..., sqlite:///...) or a folder (or file: URI): a local file store, a relative folder
    # read from the folder the command started in (not Hydra's run folder)
    uri: str = "outputs/mlruns"
    experiment: str = "sslfuse"
    parent: Optional[str] = None  # the id of a run to nest every run under (null: the sweep's, in a sweep)

    def rules(self) -> dict[str, Rule]:
        return {"uri": NOT_BLANK, "experiment": NOT_BLANK}


TRACKERS: Registry[type["Tracker"]] = Registry("tracking")


@TRACKERS.register("none", TrackingConfig)
class Tracker:
    """Records nothing: the interface the stages call (``tracking=none``)."""

    def __init__(
        self, config: Optional[TrackingConfig] = None, start: Optional[Path] = None, sweep_dir: Optional[Path] = None
    ) -> None:
        """``start``: the folder the command started in; ``sweep_dir``: the Hydra sweep's folder (None: no sweep)."""

    @contextlib.contextmanager
    def parent(self, name: str, kind: str, params: Optional[dict[str, Any]] = None) -> Iterator[None]:
        """A run open while the block runs: the runs logged in it nest under it; failed if the block raises."""
        yield

    def log_run(
        self,
        name: str,
        kind: str,
        params: dict[str, Any],
        metrics: dict[str, Any],
        artifacts: Iterable[Path] = (),
        steps: Optional[dict[int, dict[str, Any]]] = None,
    ) -> None:
        """One finished run: its params, its numeric metrics (others are left out), each file of ``artifacts``, and
        the numeric metrics of each step of ``steps`` (step -> metrics: an epoch's loss, ...) at that step."""

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Files onto the innermost open ``parent`` run."""

    def nesting(self) -> dict[str, Any]:
        """The ``tracking`` options that make another process's runs nest under the innermost open parent run, or
        under the base parent (empty: nothing to nest)."""
        return {}


def file_store(uri: str, start: Path) -> Optional[Path]:
    """The folder of a local file store that ``uri`` names (a path, relative to ``start``, or a file: URI); None for
    another tracking store (a server, a database)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    return (start / Path(parsed.path if parsed.scheme else uri).expanduser()).resolve()


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@TRACKERS.register("mlflow", MlflowConfig)
class MlflowTracker(Tracker):
    """Runs in an MLflow tracking store, by ``MlflowClient`` (no active-run state: runs nest by ``PARENT_TAG``).

    A local file store is allowed by setting ``MLFLOW_ALLOW_FILE_STORE=true`` (unless the environment sets it):
    MLflow 3 keeps file stores in maintenance mode and refuses them without it."""

    def __init__(self, config: MlflowConfig, start: Path, sweep_dir: Optional[Path] = None) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError(f"tracking=mlflow needs MLflow, which is not installed: {INSTALL}") from None
        folder = file_store(config.uri, start)
        if folder is not None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.config = config
        self.uri = config.uri if folder is None else folder.as_uri()
        self.client, self.experiment_id = self._connect(mlflow, config.experiment)
        self.start, self.sweep_dir = start, sweep_dir
        self.open: list[str] = []  # the parent runs open now, innermost last
        self._base: Optional[str] = None

    def _connect(self, mlflow: ModuleType, name: str) -> tuple[Any, str]:
        """A client of the store and the id of its experiment ``name``, created if the store lacks it (a parallel job
        may create it first); a store that cannot be opened is refused in one line naming ``tracking.uri``."""
        from mlflow.exceptions import MlflowException

        try:
            client = mlflow.MlflowClient(self.uri)
            found = client.get_experiment_by_name(name)
            if found is not None:
                return client, found.experiment_id
            try:
                return client, client.create_experiment(name, tags=EXPERIMENT_TAGS)
            except MlflowException:
                return client, client.get_experiment_by_name(name).experiment_id
        except (MlflowException, OSError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"tracking.uri={self.uri}: the MLflow store cannot be opened: {reason}") from None

    def base_parent(self) -> Optional[str]:
        """``tracking.parent``, else the sweep's parent run (created by the first job), else None."""
        if self._base is None:
            self._base = self.config.parent or (self._sweep_parent() if self.sweep_dir is not None else None)
        return self._base

    def _sweep_parent(self) -> str:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(self.sweep_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            swept = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'")
            for run in swept:
                if run.data.tags.get(SWEEP_TAG) == str(self.sweep_dir):
                    return run.info.run_id
            tags = {KIND_TAG: "sweep", SWEEP_TAG: str(self.sweep_dir)}
            return self.client.create_run(
                self.experiment_id, run_name=f"sweep {os.path.relpath(self.sweep_dir, self.start)}", tags=tags
            ).info.run_id

    def _start(self, name: str, kind: str, params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        above = self.open[-1] if self.open else self.base_parent()
        tags = {KIND_TAG: kind, **({PARENT_TAG: above} if above else {})}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        logged = [Param(key, str(value)) for key, value in params.items()]
        for first in range(0, len(logged), MAX_PARAMS):
            self.client.log_batch(run_id, params=logged[first : first + MAX_PARAMS])
        return run_id

    def _finish(self, run_id: str, status: str = "FINISHED") -> None:
        """End ``run_id``; a run directly under the sweep's parent ends that too (again), so that the sweep's parent
        reads finished, at the time of its last job's end."""
        self.client.set_terminated(run_id, status)
        if not self.open and self.config.parent is None and self._base is not None:
            self.client.set_terminated(self._base)

    @contextlib.contextmanager
    def parent(self, name: str, kind: str, params: Optional[dict[str, Any]] = None) -> Iterator[None]:
        run_id = self._start(name, kind, params or {})
        self.open.append(run_id)
        try:
            yield
        except BaseException:
            self.open.pop()
            self._finish(run_id, "FAILED")
            raise
        self.open.pop()
        self._finish(run_id)

    def log_run(
        self,
        name: str,
        kind: str,
        params: dict[str, Any],
        metrics: dict[str, Any],
        artifacts: Iterable[Path] = (),
        steps: Optional[dict[int, dict[str, Any]]] = None,
    ) -> None:
        from mlflow.entities import Metric

        run_id = self._start(name, kind, params)
        now = int(time.time() * 1000)
        logged = [Metric(key, float(value), now, 0) for key, value in metrics.items() if numeric(value)]
        for step, values in (steps or {}).items():
            logged += [Metric(key, float(value), now, step) for key, value in values.items() if numeric(value)]
        for first in range(0, len(logged), MAX_METRICS):
            self.client.log_batch(run_id, metrics=logged[first : first + MAX_METRICS])
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self._finish(run_id)

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.open[-1], str(path))

    def nesting(self) -> dict[str, Any]:
        parent = self.open[-1] if self.open else self.base_parent()
        return {"uri": self.uri, "experiment": self.config.experiment, "parent": parent}


def open_tracker(node: Any, start: Path, sweep_dir: Optional[Path] = None) -> Tracker:
    """The tracker ``tracking`` names, checked (a one-line UserError for a bad option, or for ``mlflow`` without
    MLflow installed); ``start``: the folder relative store paths are read from; ``sweep_dir``: a Hydra sweep's."""
    config = TRACKERS.typed_config(node, key="tracking")
    return TRACKERS.get(config.name).impl(config, start, sweep_dir)
