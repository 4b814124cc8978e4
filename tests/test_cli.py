"""The command-line contract, exercised through subprocesses as a user would."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest
from conftest import sslfuse

SMOKE_TEST_IMAGES = 256  # conf/dataset/synthetic.yaml: n_test


def test_help_lists_every_stage(tmp_path):
    out = sslfuse("--help", cwd=tmp_path).stdout
    for stage in ("pretrain", "cache", "fuse", "run", "report"):
        assert f"  {stage}" in out


def test_unknown_stage_is_one_line_error(tmp_path):
    proc = sslfuse("pretrian", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown stage 'pretrian'" in proc.stderr and "pretrain" in proc.stderr


@pytest.mark.slow
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
    by_run = {(r["method"], r["seed"]): r for r in results}
    for r in results:
        # A share of the 256 synthetic test images (64 per class, chance 0.25): a whole number of them right. The
        # classes are easy to tell apart (measured with 5% labels: 0.988-1.0 for every method and seed).
        assert (r["test_accuracy"] * SMOKE_TEST_IMAGES) % 1 == 0 and r["test_accuracy"] > 0.5, r
    for seed in range(3):
        select = by_run[("select[by=val](rotation+simclr+random)", seed)]
        kept = [p for p in select["pretexts"] if p not in select["screened_out"]]
        # the best score among the pretexts the screen kept, the first of them on a tie (scores of 1.0 are common here)
        assert select["chosen_pretext"] == max(kept, key=select["selection_scores"].__getitem__), select
        # then the head and its hyperparameter search are single's, on the chosen pretext's features: the same result
        single = by_run[(f"single({select['chosen_pretext']})", seed)]
        for key in ("test_accuracy", "selected_l2", "selected_steps", "labeled_indices_sha256"):
            assert select[key] == single[key], (key, select[key], single[key])
    for r in results:
        if r["family"] != "attention":
            continue
        weights, per_class = r["mean_pretext_weights"], r["pretext_weights_per_class"]
        # a pretext the screen left out gets weight exactly 0, a kept one a positive share
        assert {p for p, w in weights.items() if w == 0} == set(r["screened_out"]), r
        # the mean over the test images equals the mean of the four per-class means (the classes are of equal size)
        assert sorted(per_class) == ["class0", "class1", "class2", "class3"]  # the synthetic classes' names
        for pretext, weight in weights.items():
            assert weight == pytest.approx(sum(c[pretext] for c in per_class.values()) / 4, abs=1e-6), (pretext, r)
    report = pd.read_csv(run / "report.csv").set_index("method")
    assert set(report.index) == methods and (report["seeds"] == 3).all()
    for method in methods:  # mean and sample standard deviation, in %, of the three seeds' accuracies
        accuracies = [100 * by_run[(method, seed)]["test_accuracy"] for seed in range(3)]
        assert report.loc[method, "mean"] == pytest.approx(statistics.mean(accuracies), abs=1e-9), method
        assert report.loc[method, "std"] == pytest.approx(statistics.stdev(accuracies), abs=1e-9), method
    assert "± " in (run / "report.md").read_text()


@pytest.mark.slow
def test_second_run_recomputes_nothing(smoke_workspace):
    proc = sslfuse("run", "preset=smoke", "hydra.run.dir=second_run", cwd=smoke_workspace)
    log = proc.stdout + proc.stderr
    assert log.count("reused encoder") == 3 and log.count("reused cached features") == 3
    assert "pretraining encoder" not in log and "epoch 1/" not in log
    first = pd.read_csv(smoke_workspace / "first_run" / "report.csv")
    second = pd.read_csv(smoke_workspace / "second_run" / "report.csv")
    pd.testing.assert_frame_equal(first, second)


@pytest.mark.slow
def test_cache_without_encoder_names_the_pretrain_command(tmp_path):
    proc = sslfuse("cache", "preset=smoke", "pretexts=[rotation]", "encoder_seed=7", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "sslfuse pretrain pretext=rotation preset=smoke seed=7" in line


@pytest.mark.slow
def test_stages_one_by_one_then_report_of_a_multirun(tmp_path):
    sslfuse("pretrain", "preset=smoke", "pretext=rotation", "hydra.run.dir=p1", cwd=tmp_path)
    sslfuse("pretrain", "preset=smoke", "pretext=random", "hydra.run.dir=p2", cwd=tmp_path)
    sslfuse("cache", "preset=smoke", "pretexts=[rotation,random]", "hydra.run.dir=c", cwd=tmp_path)
    manifests = list((tmp_path / "outputs" / "artifacts" / "features").glob("*/manifest.json"))
    assert len(manifests) == 2
    sslfuse(
        "fuse",
        "-m",
        "preset=smoke",
        "pretexts=[rotation,random]",
        "fusion=attention,concat",
        "seed=0,1",
        "labels.per_class=5",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
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


@pytest.mark.slow
def test_fuse_single_needs_its_pretext(tmp_path):
    proc = sslfuse("fuse", "preset=smoke", "fusion=single", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "fusion.pretext" in proc.stderr


@pytest.mark.slow
def test_cfg_job_prints_composed_config(tmp_path):
    out = sslfuse("fuse", "fusion=concat", "labels.fraction=0.1", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: concat" in out and "fraction: 0.1" in out and "name: fashion_mnist" in out


@pytest.mark.slow
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


@pytest.mark.slow
def test_few_labels_per_class_give_cross_validated_results_and_one_per_class_a_fixed_setting(smoke_workspace):
    """``sslfuse fuse labels.per_class=N`` on the smoke run's cached features (4 classes): with 2 and 5 labels per class
    the result records 2 and 5 folds and a cross-validated accuracy over all labeled images; with 1 there is nothing to
    hold out: the result records 0 folds and the fixed setting; pretext matching by cross-validation is refused in one
    line naming the keys, before any work, writing no result."""
    for per_class, folds in ((1, 0), (2, 2), (5, 5)):
        sslfuse(
            "fuse",
            "preset=smoke",
            "fusion=concat",
            f"labels.per_class={per_class}",
            f"hydra.run.dir=pc{per_class}",
            cwd=smoke_workspace,
        )
        result = json.loads((smoke_workspace / f"pc{per_class}" / "results.json").read_text())
        assert result["folds"] == folds and result["n_labeled"] == 4 * per_class
        if folds:
            assert round(result["cv_accuracy"] * result["n_labeled"], 6) == round(
                result["cv_accuracy"] * result["n_labeled"]
            )
        else:
            assert result["cv_accuracy"] is None and result["selection"].startswith("fixed")
    refused = sslfuse(
        "fuse",
        "preset=smoke",
        "fusion=select",
        "labels.per_class=1",
        "hydra.run.dir=sel1",
        cwd=smoke_workspace,
        check=False,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "labels.per_class >= 2" in refused.stderr, refused.stderr
    assert not (smoke_workspace / "sel1" / "results.json").exists()


@pytest.mark.slow
def test_run_over_two_encoder_seeds_pairs_and_pools_them_by_name(smoke_workspace):
    """Encoder seed 1 is pretrained beside the stored seed 0; every result records its encoder seed, and the report
    pools the two only under a heading that names them, with n as encoder seeds × label seeds."""
    sslfuse(
        "run",
        "preset=smoke",
        "encoder_seeds=[0,1]",
        "seeds=[0,1]",
        "fusions=[concat,mean]",
        "pretexts=[rotation,random]",
        "hydra.run.dir=two_encoder_seeds",
        cwd=smoke_workspace,
    )
    run = smoke_workspace / "two_encoder_seeds"
    results = [json.loads(p.read_text()) for p in run.rglob("results.json")]
    concat = [(r["encoder_seed"], r["seed"]) for r in results if r["family"] == "concat"]
    assert sorted(concat) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r["labeled_indices_sha256"] for r in results if r["seed"] == 0}) == 1  # a label seed: one subset
    markdown = (run / "report.md").read_text()
    assert "encoder seed 0+1" in markdown and "(n=2×2)" in markdown
    assert "encoder seed 0\n" in markdown and "encoder seed 1\n" in markdown
    paired = pd.read_csv(run / "paired_differences.csv").set_index(["method", "reference"])
    assert paired.loc[("mean(rotation+random)", "concat"), "pairs"] == "4 (2×2)"
    stored = {
        p.parent.name for p in (smoke_workspace / "outputs" / "artifacts" / "encoders").glob("rotation-*/manifest.json")
    }
    assert len(stored) >= 2  # seed 1 is another encoder, not seed 0's reused
