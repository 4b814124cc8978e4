"""Sweeps on Hydra's launcher plugins: parallel local jobs (joblib) sharing one store, and the SLURM config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import sslfuse


def plugin_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_joblib = pytest.mark.skipif(
    not plugin_installed("hydra_plugins.hydra_joblib_launcher"),
    reason="hydra-joblib-launcher is not installed (pip install 'sslfuse[launchers]')",
)
needs_submitit = pytest.mark.skipif(
    not plugin_installed("hydra_plugins.hydra_submitit_launcher"),
    reason="hydra-submitit-launcher is not installed (pip install 'sslfuse[launchers]')",
)
PRETEXTS = "pretexts=[rotation,random]"


def job_logs(sweep: Path) -> str:
    return "\n".join(path.read_text() for path in sweep.glob("*/*.log"))


@pytest.mark.slow
@needs_joblib
def test_parallel_jobs_share_the_store_and_a_joblib_sweep_is_reported(tmp_path):
    # two concurrent jobs that need the same encoders and features: one builds each, the other reuses it
    sslfuse(
        "run",
        "-m",
        "preset=smoke",
        PRETEXTS,
        "fusions=[concat]",
        "seeds=[0],[1]",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=prep",
        cwd=tmp_path,
    )
    logs = job_logs(tmp_path / "prep")
    for pretext in ("rotation", "random"):
        assert logs.count(f"pretraining encoder {pretext}-") == 1, logs
        assert logs.count(f"reused encoder {pretext}-") == 1, logs
    artifacts = tmp_path / "outputs" / "artifacts"
    assert len(list(artifacts.glob("encoders/*/manifest.json"))) == 2
    assert len(list(artifacts.glob("features/*/manifest.json"))) == 2

    sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        PRETEXTS,
        "fusion=concat,mean",
        "seed=0,1",
        "labels.per_class=5",
        "hydra/launcher=local",
        "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [path.parent.name for path in results] == ["0", "1", "2", "3"], "every job wrote its results"
    assert {json.loads(path.read_text())["method"] for path in results} == {
        "concat(rotation+random)",
        "mean(rotation+random)",
    }
    sslfuse("report", "sweep", cwd=tmp_path)
    table = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert sorted(table["method"]) == ["concat(rotation+random)", "mean(rotation+random)"]
    assert (table["seeds"] == 2).all()


@needs_submitit
@pytest.mark.parametrize("launcher", ["slurm", pytest.param("submitit_slurm", marks=pytest.mark.slow)])
def test_slurm_launcher_config_composes(tmp_path, launcher):
    """The project's SLURM launcher config (fast tier) and the plugin's own (slow: a second ~5 s CLI start that adds
    little)."""
    out = sslfuse("fuse", f"hydra/launcher={launcher}", "--cfg", "hydra", cwd=tmp_path).stdout
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in out
    assert f"hydra/launcher: {launcher}" in out
    if launcher == "slurm":  # the project's defaults on top of the plugin's
        assert "gpus_per_node: 1" in out and "timeout_min: 240" in out


def test_a_missing_launcher_plugin_is_one_line(tmp_path, monkeypatch):
    from ssl_fusion import cli

    monkeypatch.setitem(cli.LAUNCHER_PLUGINS, "local", "hydra_plugins.not_installed_launcher")
    problem = cli.launch_problem("fuse", ["-m", "hydra/launcher=local"])
    assert problem == "hydra/launcher=local needs its Hydra plugin: pip install 'sslfuse[launchers]'"
