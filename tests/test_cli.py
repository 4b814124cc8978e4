"""The command-line contract, exercised through subprocesses as a user would."""

from __future__ import annotations

import json

import pandas as pd
from conftest import sslfuse


def test_help_lists_every_stage(tmp_path):
    out = sslfuse("--help", cwd=tmp_path).stdout
    for stage in ("pretrain", "cache", "fuse", "run", "report"):
        assert f"  {stage}" in out


def test_unknown_stage_is_one_line_error(tmp_path):
    proc = sslfuse("pretrian", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown stage 'pretrian'" in proc.stderr and "pretrain" in proc.stderr


def test_smoke_run_writes_results_and_table(smoke_workspace):
    run = smoke_workspace / "first_run"
    results = [json.loads(p.read_text()) for p in run.rglob("results.json")]
    methods = {r["method"] for r in results}
    assert methods == {
        "attention(rotation+simclr+random)",
        "concat(rotation+simclr+random)",
        "select[by=val](rotation+simclr+random)",
        "single(rotation)",
        "single(simclr)",
        "single(random)",
    }
    assert len(results) == 6 * 3  # three seeds each
    (chosen,) = {r["chosen_pretext"] for r in results if r["fusion"] == "select" and r["seed"] == 0}
    assert chosen in {"rotation", "simclr", "random"}
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in results)
    attention = [r for r in results if r["fusion"] == "attention"]
    assert all(abs(sum(r["mean_pretext_weights"].values()) - 1) < 1e-5 for r in attention)
    report = pd.read_csv(run / "report.csv")
    assert set(report["method"]) == methods and (report["seeds"] == 3).all()
    assert "± " in (run / "report.md").read_text()


def test_second_run_recomputes_nothing(smoke_workspace):
    proc = sslfuse("run", "preset=smoke", "hydra.run.dir=second_run", cwd=smoke_workspace)
    log = proc.stdout + proc.stderr
    assert log.count("reused encoder") == 3 and log.count("reused cached features") == 3
    assert "pretraining encoder" not in log and "epoch 1/" not in log
    first = pd.read_csv(smoke_workspace / "first_run" / "report.csv")
    second = pd.read_csv(smoke_workspace / "second_run" / "report.csv")
    pd.testing.assert_frame_equal(first, second)


def test_cache_without_encoder_names_the_pretrain_command(tmp_path):
    proc = sslfuse("cache", "preset=smoke", "pretexts=[rotation]", "encoder_seed=7", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "sslfuse pretrain pretext=rotation preset=smoke seed=7" in line


def test_stages_one_by_one_then_report_of_a_multirun(tmp_path):
    sslfuse("pretrain", "preset=smoke", "pretext=rotation", "hydra.run.dir=p1", cwd=tmp_path)
    sslfuse("pretrain", "preset=smoke", "pretext=random", "hydra.run.dir=p2", cwd=tmp_path)
    sslfuse("cache", "preset=smoke", "pretexts=[rotation,random]", "hydra.run.dir=c", cwd=tmp_path)
    manifests = list((tmp_path / "outputs" / "artifacts" / "features").glob("*/manifest.json"))
    assert len(manifests) == 2
    sslfuse(
        "fuse", "-m", "preset=smoke", "pretexts=[rotation,random]", "fusion=attention,concat", "seed=0,1",
        "labels.per_class=5", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )
    results = list((tmp_path / "sweep").rglob("results.json"))
    assert len(results) == 4
    one_row = pd.read_csv(results[0].with_name("results.csv"))
    assert len(one_row) == 1 and one_row.loc[0, "regime"] == "5/class" and one_row.loc[0, "n_labeled"] == 20
    out = sslfuse("report", "sweep", cwd=tmp_path).stdout
    assert "attention(rotation+random)" in out
    table = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert sorted(table["method"]) == ["attention(rotation+random)", "concat(rotation+random)"]
    assert (table["seeds"] == 2).all() and (table["regime"] == "5/class").all()


def test_fuse_single_needs_its_pretext(tmp_path):
    proc = sslfuse("fuse", "preset=smoke", "fusion=single", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "fusion.pretext" in proc.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    out = sslfuse("fuse", "fusion=concat", "labels.fraction=0.1", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: concat" in out and "fraction: 0.1" in out and "name: fashion_mnist" in out


def test_bad_inputs_are_refused_in_one_line(tmp_path):
    cases = {
        ("run", "preset=smoke", "pretexts=[rotation,jigsw]"): "unknown pretext 'jigsw'",
        ("run", "preset=smoke", "pretexts=[rotation,rotation]"): "more than once",
        ("run", "preset=smoke", "labels.fraction=1.5"): "labels.fraction must be in (0, 1]",
        ("pretrain", "preset=smoke", "pretext.tempreature=0.1", "pretext=simclr"): "tempreature",
        ("run", "preset=smoke", "data_dir=/no/such/folder"): "data_dir",
        ("run", "preset=smoke", "device=cuda"): "device",
    }
    for args, expected in cases.items():
        proc = sslfuse(*args, cwd=tmp_path, check=False)
        assert proc.returncode != 0, args
        assert expected in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr, args
    assert not (tmp_path / "outputs" / "artifacts").exists()
