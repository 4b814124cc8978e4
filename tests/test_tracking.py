"""Experiment tracking (``tracking=mlflow``): runs written to a real local MLflow file store, read back with MLflow's
own client; and the refusal without the ``tracking`` extra."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import sslfuse

from ssl_fusion.cli import installed
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.runtime.tracking import INSTALL, KIND_TAG, PARENT_TAG, SWEEP_TAG, file_store, open_tracker

needs_joblib = pytest.mark.skipif(
    not installed("hydra_plugins.hydra_joblib_launcher"),
    reason="hydra-joblib-launcher is not installed (pip install 'sslfuse[launchers]')",
)
needs_mlflow = pytest.mark.skipif(not installed("mlflow"), reason=f"MLflow is not installed ({INSTALL})")


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A folder for an MLflow file store, which MLflow 3 reads only with ``MLFLOW_ALLOW_FILE_STORE=true``."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path / "mlruns"


def read_runs(store: Path, experiment: str = "sslfuse") -> tuple[object, list]:
    """MLflow's client on ``store`` and every run of ``experiment`` in it."""
    import mlflow

    client = mlflow.MlflowClient(store.as_uri())
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id])


def of_kind(runs: list, kind: str) -> list:
    return [run for run in runs if run.data.tags.get(KIND_TAG) == kind]


def parent_of(run) -> str | None:
    return run.data.tags.get(PARENT_TAG)


def logged_steps(client, run, key: str) -> dict[int, float]:
    """Each step's value of metric ``key`` of ``run`` (one value per step)."""
    history = client.get_metric_history(run.info.run_id, key)
    steps = {point.step: point.value for point in history}
    assert len(steps) == len(history), f"{key}: a step logged twice"
    return steps


def artifacts(client, run) -> set[str]:
    return {item.path for item in client.list_artifacts(run.info.run_id)}


def test_tracking_mlflow_without_the_extra_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without MLflow gives on import
    with pytest.raises(UserError) as refused:
        open_tracker({"name": "mlflow"}, tmp_path)
    assert INSTALL == "pip install 'sslfuse[tracking]'" and INSTALL in str(refused.value)
    assert "\n" not in str(refused.value) and not any(tmp_path.iterdir())


def test_a_relative_store_is_read_from_the_folder_the_command_started_in(tmp_path):
    assert file_store("outputs/mlruns", tmp_path) == tmp_path / "outputs" / "mlruns"
    assert file_store((tmp_path / "elsewhere").as_uri(), tmp_path / "start") == tmp_path / "elsewhere"
    assert file_store("http://localhost:5000", tmp_path) is None
    assert file_store("sqlite:///mlflow.db", tmp_path) is None


@needs_mlflow
def test_a_store_that_cannot_be_opened_is_refused_in_one_line_naming_the_key(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match=r"^tracking.uri=file://.*a_file/mlruns: the MLflow store cannot be opened"):
        open_tracker({"name": "mlflow", "uri": "a_file/mlruns"}, tmp_path)


@needs_mlflow
def test_jobs_of_one_sweep_nest_under_one_parent_and_a_block_under_its_run(store, tmp_path):
    sweep = tmp_path / "sweep"
    config = {"name": "mlflow", "uri": str(store)}
    first, second = (open_tracker(config, tmp_path, sweep) for _ in range(2))  # two jobs, as two processes see it
    first.log_run("fuse a", "fuse", {"seed": 0}, {"test_accuracy": 0.5, "note": "not a number"})
    with second.parent("run b", "run", {"fusions": "concat"}):
        assert second.nesting()["parent"] == second.open[-1]
        second.log_run("pretrain b", "pretrain", {"seed": 1}, {}, steps={1: {"loss": 3.0}, 2: {"loss": 2.0}})
    with pytest.raises(RuntimeError), second.parent("run c", "run"):
        raise RuntimeError("the stage failed")

    client, runs = read_runs(store)
    (parent,) = of_kind(runs, "sweep")
    assert parent.data.tags[SWEEP_TAG] == str(sweep) and parent.info.status == "FINISHED"
    by_name = {run.info.run_name: run for run in runs}
    assert {parent_of(by_name[name]) for name in ("fuse a", "run b", "run c")} == {parent.info.run_id}
    assert parent_of(by_name["pretrain b"]) == by_name["run b"].info.run_id
    assert by_name["fuse a"].data.metrics == {"test_accuracy": 0.5} and by_name["fuse a"].data.params == {"seed": "0"}
    assert logged_steps(client, by_name["pretrain b"], "loss") == {1: 3.0, 2: 2.0}
    assert by_name["run c"].info.status == "FAILED"
    experiment = client.get_experiment_by_name("sslfuse")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs


@needs_mlflow
def test_a_given_parent_run_is_nested_under_instead_of_the_sweeps(store, tmp_path):
    outer = open_tracker({"name": "mlflow", "uri": str(store)}, tmp_path)
    with outer.parent("study s", "study"):
        nesting = outer.nesting()
        inner = open_tracker({"name": "mlflow", **nesting}, tmp_path / "elsewhere", tmp_path / "sweep")
        inner.log_run("fuse", "fuse", {}, {})
    _, runs = read_runs(store)
    (study,) = of_kind(runs, "study")
    assert nesting["uri"] == store.as_uri() and [parent_of(run) for run in of_kind(runs, "fuse")] == [study.info.run_id]
    assert not of_kind(runs, "sweep")


def results_of(sweep: Path) -> dict[int, tuple[Path, dict]]:
    """The folder and ``results.json`` of each job of ``sweep``, by label seed."""
    records = [(path.parent, json.loads(path.read_text())) for path in sweep.glob("*/results.json")]
    return {record["seed"]: (folder, record) for folder, record in records}


@pytest.mark.slow
@needs_mlflow
def test_a_fuse_sweep_is_a_parent_run_of_its_fuses_and_report_logs_its_files(smoke_workspace, store, tmp_path):
    sweep = tmp_path / "sweep"
    sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        "fusion=concat",
        "seed=0,1",
        "tracking=mlflow",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=smoke_workspace,
    )
    client, runs = read_runs(store)
    (parent,) = of_kind(runs, "sweep")
    fuses = of_kind(runs, "fuse")
    assert len(fuses) == 2 and {parent_of(run) for run in fuses} == {parent.info.run_id}
    written = results_of(sweep)
    for run in fuses:
        params, metrics = run.data.params, run.data.metrics
        folder, record = written[int(params["seed"])]  # the run of each job holds what its results.json holds
        assert params["family"] == "concat" and params["pretexts"] == "rotation+simclr+random"
        assert params["regime"] == "1%" and params["encoder_seed"] == "0" and params["fusion.folds"] == "5"
        for key in ("test_accuracy", "test_macro_f1", "selected_l2", "selected_steps"):
            assert metrics[key] == pytest.approx(record[key])
        assert artifacts(client, run) == {"predictions.npz", "results.json"}
        logged = client.download_artifacts(run.info.run_id, "predictions.npz", str(tmp_path / run.info.run_id))
        assert Path(logged).read_bytes() == (folder / "predictions.npz").read_bytes()

    sslfuse("report", str(sweep), "--tracking=mlflow", f"--tracking-uri={store}", cwd=smoke_workspace)
    client, runs = read_runs(store)
    (report,) = of_kind(runs, "report")
    assert {"report.md", "report.csv", "results_long.csv", "accuracy_vs_labels.png"} <= artifacts(client, report)


@pytest.mark.slow
@needs_mlflow
def test_a_study_is_the_parent_of_its_run_jobs_and_they_of_their_fuses_and_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sslfuse("study", "study=smoke", "tracking=mlflow", "hydra.run.dir=verdicts", cwd=tmp_path)
    store = tmp_path / "outputs" / "mlruns"  # the default store, under the folder the command started in
    client, runs = read_runs(store)
    (study,) = of_kind(runs, "study")
    jobs = of_kind(runs, "run")
    assert len(jobs) == 2 and {parent_of(run) for run in jobs} == {study.info.run_id}  # one per encoder seed
    assert {"verdicts.md", "verdicts.csv"} <= artifacts(client, study) and not of_kind(runs, "sweep")
    fuses = of_kind(runs, "fuse")
    assert len(fuses) == len(list((tmp_path / "outputs" / "studies").rglob("results.json"))) == 2 * 2 * 3
    assert {parent_of(run) for run in fuses} == {run.info.run_id for run in jobs}
    pretrainings = of_kind(runs, "pretrain")
    manifests = list((tmp_path / "outputs" / "artifacts" / "encoders").glob("*/manifest.json"))
    assert len(pretrainings) == len(manifests) == 2 * 2  # rotation and random, for each encoder seed
    for run in pretrainings:  # each holds its encoder's manifest: the history per epoch, the final probes
        (manifest,) = [path for path in manifests if run.info.run_name == f"pretrain {path.parent.name}"]
        stored = json.loads(manifest.read_text())
        for key in ("loss", "images_per_second"):
            expected = {entry["epoch"]: entry[key] for entry in stored["metrics"]["history"]}
            assert logged_steps(client, run, key) == pytest.approx(expected)
        for key in ("knn_accuracy", "linear_accuracy"):  # the latest value: the final probe, trained or not
            assert run.data.metrics[key] == pytest.approx(stored["metrics"][key])
        assert set(stored["files"]) - {"encoder.pt"} | {"manifest.json"} == artifacts(client, run)
        assert parent_of(run) in {job.info.run_id for job in jobs}
    assert "pretraining_curve.png" in set.union(*(artifacts(client, run) for run in pretrainings))


@needs_mlflow
def test_a_file_store_is_allowed_where_the_environment_does_not_say_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "unset below")  # so that the test leaves the environment as it was
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 refuses a file store without it
    open_tracker({"name": "mlflow"}, tmp_path)
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true" and (tmp_path / "outputs" / "mlruns").is_dir()


@pytest.mark.slow
def test_the_cli_refuses_tracking_mlflow_without_the_extra_before_any_work(tmp_path, monkeypatch):
    hidden = tmp_path / "without_mlflow" / "mlflow"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")]))
    refused = sslfuse("fuse", "preset=smoke", "tracking=mlflow", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert refused.stderr.startswith("sslfuse fuse: error: tracking=mlflow") and INSTALL in refused.stderr
    assert not (tmp_path / "outputs" / "artifacts").exists() and not (tmp_path / "outputs" / "mlruns").exists()


@pytest.mark.slow
@needs_mlflow
@needs_joblib
def test_jobs_of_a_joblib_sweep_in_parallel_processes_nest_under_one_parent(smoke_workspace, store, tmp_path):
    sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        "fusion=concat",
        "seed=0,1,2",
        "tracking=mlflow",
        f"tracking.uri={store}",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=smoke_workspace,
    )
    _, runs = read_runs(store)
    (parent,) = of_kind(runs, "sweep")
    fuses = of_kind(runs, "fuse")
    assert sorted(run.data.params["seed"] for run in fuses) == ["0", "1", "2"]
    assert {parent_of(run) for run in fuses} == {parent.info.run_id}


@pytest.mark.slow
@needs_mlflow
def test_sslfuse_pretrain_records_each_epoch_and_the_probes_once_and_not_a_reused_encoder(store, tmp_path):
    arguments = ["preset=smoke", "pretext=rotation", "train.epochs=2", "probe.every_epochs=1", "tracking=mlflow"]
    for again in range(2):
        sslfuse("pretrain", *arguments, f"tracking.uri={store}", f"hydra.run.dir=p{again}", cwd=tmp_path)
    client, runs = read_runs(store)
    (run,) = of_kind(runs, "pretrain")  # the second pretrain reused the stored encoder
    (manifest,) = (tmp_path / "outputs" / "artifacts" / "encoders").glob("rotation-*/manifest.json")
    history = json.loads(manifest.read_text())["metrics"]["history"]
    expected = {entry["epoch"]: entry["knn_accuracy"] for entry in history}
    assert logged_steps(client, run, "knn_accuracy") == pytest.approx(expected)
    assert [entry["epoch"] for entry in history] == [1, 2] and parent_of(run) is None
    assert run.data.params["pretext.epochs"] == "2" and run.data.metrics["final_loss"] == pytest.approx(
        history[-1]["loss"]
    )
