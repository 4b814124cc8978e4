"""``scripts/bench.py``: its row arithmetic, its launcher detection, and ``--preset smoke`` end to end writing its table
as JSON (timings themselves are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

COLUMNS = {"stage", "ours", "reference", "unit", "ratio", "target", "meets"}
FIRST_ROWS = {"cache": 0.9, "pretrain rotation": 0.9, "pretrain simclr": 0.9}  # stage: target


@pytest.fixture(scope="module")
def bench():
    """scripts/bench.py imported as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location("bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_ratio_is_ours_over_reference_or_its_inverse_and_meets_compares_it_to_the_target(bench):
    faster = bench.row("cache", 1800.0, 1000.0, "img/s", 0.9)
    assert faster == {
        "stage": "cache",
        "ours": 1800.0,
        "reference": 1000.0,
        "unit": "img/s",
        "ratio": 1.8,
        "target": 0.9,
        "meets": True,
    }
    assert bench.row("cache", 850.0, 1000.0, "img/s", 0.9)["ratio"] == 0.85
    assert bench.row("cache", 850.0, 1000.0, "img/s", 0.9)["meets"] is False
    # Lower is better (seconds): the ratio is reference / ours, so taking 4x the reference's time gives 0.25.
    slow = bench.row("fuse attention", 8.0, 2.0, "s", 50.0, higher_is_better=False)
    assert (slow["ratio"], slow["meets"]) == (0.25, False)
    assert bench.row("sweep", 100.0, 150.0, "s", 1.0, higher_is_better=False)["meets"] is True
    assert bench.row("sweep", 150.0, 100.0, "s", 1.0, higher_is_better=False)["meets"] is False
    assert bench.row("cache", 123.456, 7.891, "img/s", 0.9)["ours"] == 123.46  # rounded to 2 digits for the table


def test_sweep_launcher_uses_joblib_where_the_plugin_is_installed(bench):
    # The [test] extra installs hydra-joblib-launcher.
    assert bench.sweep_launcher() == ["hydra/launcher=local", f"hydra.launcher.n_jobs={os.cpu_count()}"]


def test_sweep_launcher_falls_back_to_the_basic_launcher_without_the_hydra_plugins_package(bench, monkeypatch):
    # find_spec("hydra_plugins.x") imports hydra_plugins first; None in sys.modules makes that import raise
    # ModuleNotFoundError, as on an install without the launcher extra.
    for name in [m for m in sys.modules if m == "hydra_plugins" or m.startswith("hydra_plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hydra_plugins", None)
    with pytest.raises(ModuleNotFoundError):
        importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher")
    assert bench.sweep_launcher() == []


def ratio_bounds(ours: float, reference: float, higher_is_better: bool) -> tuple[float, float]:
    """The range of the ratio that ``ours`` and ``reference``, each rounded to 2 digits, allow (ratio rounded to 3)."""
    low_ours, high_ours = ours - 0.005, ours + 0.005
    low_ref, high_ref = max(reference - 0.005, 0.0), reference + 0.005
    if higher_is_better:
        low, high = low_ours / high_ref, (high_ours / low_ref if low_ref > 0 else math.inf)
    else:
        low, high = low_ref / high_ours, (high_ref / low_ours if low_ours > 0 else math.inf)
    return low - 0.0005, high + 0.0005


@pytest.mark.slow
def test_smoke_bench_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--artifacts-dir",
            str(tmp_path / "store"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    stages = [r["stage"] for r in rows]
    assert stages[:3] == list(FIRST_ROWS), stages
    # The [test] extra installs the joblib launcher plugin, so the sweep, last, runs one job per core.
    assert stages[-1] == f"sweep (16 runs, {os.cpu_count()} at a time)", stages
    # Between them, the head protocol against LogisticRegressionCV: accuracy and time of single (one fit per pretext
    # of the preset's one seed) and concat (one fit).
    assert stages[3:-1] == [
        f"{head} {what} vs LogisticRegressionCV ({fits} fits)"
        for head, fits in (("single", 3), ("concat", 1))
        for what in ("accuracy", "time")
    ], stages
    targets = {**FIRST_ROWS, stages[-1]: 1.0}
    for r in rows:
        assert set(r) == COLUMNS, r
        assert isinstance(r["meets"], bool), r
        for key in ("ours", "reference", "target"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["stage"], key, r[key])
        if r["stage"] in targets:
            assert r["target"] == targets[r["stage"]], r
        # Seconds: lower is better, ratio = reference / ours; any other unit (img/s, % accuracy): ratio = ours /
        # reference.
        low, high = ratio_bounds(r["ours"], r["reference"], higher_is_better=not r["unit"].startswith("s"))
        assert low <= r["ratio"] <= high, (r, low, high)
