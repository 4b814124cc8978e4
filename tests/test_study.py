"""Declared studies (``sslfuse study``, docs/studies.md): a bad study file is refused in one line before any work;
the claims are recorded before the first fuse and cannot change once results exist unless the change is declared an
amendment; the verdict rule; the smoke study runs end to end through the CLI, and a rerun computes nothing new."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import sslfuse
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssl_fusion.cli import composition_problem
from ssl_fusion.config import CONF_DIR
from ssl_fusion.evaluation.result import FuseResult, Predictions
from ssl_fusion.report.paired import Primary, Side, paired_differences
from ssl_fusion.report.results import collect_results, results_frame
from ssl_fusion.report.verdicts import (
    INCONCLUSIVE,
    MAIN,
    MET,
    NOT_MET,
    Claim,
    ClaimConfig,
    judge,
    verdict,
    write_verdicts,
)
from ssl_fusion.runtime.errors import UserError
from ssl_fusion.stages.declaration import CLAIMS_FILE, check_study, declare
from ssl_fusion.stages.study import cell_folder, cell_overrides, check_jobs


def refusal(*overrides: str) -> str:
    """What ``sslfuse study`` answers before any work, run in this process: the CLI's composition check, then the
    study's own checks (``check_study``, ``check_jobs``)."""
    problem = composition_problem("study", list(overrides))
    if problem:
        return problem
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="study", overrides=list(overrides))
        try:
            check_jobs(check_study(cfg.study), list(cfg.run))
        except UserError as err:
            return str(err)
    raise AssertionError(f"not refused: {overrides}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "You must specify 'study'"),
        (["study=nope"], "smoke"),
        (
            ["study=smoke", "study.heads=[atention]"],
            "unknown fusion 'atention' in study.heads; valid fusions: attention",
        ),
        (["study=smoke", "study.pretexts=[rotaton]"], "unknown pretext 'rotaton' in study.pretexts"),
        (["study=smoke", "study.datasets=[mnist2]"], "unknown dataset 'mnist2' in study.datasets"),
        (["study=smoke", "study.references=[concat,attention]"], "study.references: attention is also a head"),
        (["study=smoke", "study.claims.0.method=mean"], "study.claims[0].method: 'mean' never runs in this study"),
        (["study=smoke", "study.claims.0.datasets=[digits]"], "study.claims[0].datasets: digits in ['digits']"),
        (
            ["study=smoke", "study.regimes=[{fraction:0.01,datasets:[digits]}]"],
            "study.regimes[0].datasets: digits is not a dataset of this study (synthetic)",
        ),
        (
            ["study=smoke", "study.datasets=[synthetic,digits]", "study.regimes=[{fraction:0.01,datasets:[digits]}]"],
            "study.claims[0]: 1% does not run on synthetic",
        ),
        (
            ["study=smoke", "study.claims.1.reference=ensemble"],
            "study.claims[1].reference: 'ensemble' never runs in this study as a reference",
        ),
        (
            ["study=smoke", "study.claims.0.reference=best-single"],
            "study.claims[0].reference: best-single needs single",
        ),
        (
            ["study=smoke", "study.claims.0.margin=abc"],
            "study.claims.0.margin=abc (Value 'abc' of type 'str' could not be",
        ),
        (
            ["study=smoke", "study.claims=[{method:attention,reference:concat,regime:'1%',margin:big}]"],
            "Value 'big' of type 'str' could not be converted to Float",
        ),
        (
            ["study=smoke", "study.claims=[{method:attention,reference:concat,regime:'1%'}]"],
            "study.claims[0].margin is missing",
        ),
        (
            ["study=smoke", "study.claims=[{method:attention,reference:concat,regime:'1%',margin:1,by:2}]"],
            "Key 'by' not in 'ClaimConfig'); allowed keys of a ClaimConfig: method, reference, regime, margin, "
            "direction",
        ),
        (["study=smoke", "study.heds=[attention]"], "allowed keys under study: datasets,"),
        (["study=smoke", "study.claims.0.margin=nan"], "study.claims[0]: margin must be a finite number"),
        (
            ["study=smoke", "study.claims.0.direction=bigger"],
            "study.claims[0]: direction: 'bigger' is not one of greater, less, equivalent",
        ),
        (["study=smoke", "study.claims.0.regime=5%"], "study.claims[0].regime: '5%' is not a regime of this study"),
        (["study=smoke", "study.claims.1.margin=0"], "study.claims[1].margin must be > 0 for direction equivalent"),
        (
            ["study=smoke", "study.claims.1.reference=concat"],
            "study.claims[1]: attention against concat at 1% is claimed",
        ),
        (["study=smoke", "study.claims=[]"], "study.claims must be a non-empty list of claims"),
        (["study=smoke", "study.label_seeds=[0,0]"], "study.label_seeds must be a non-empty list without repeats"),
        (["study=smoke", "study.regimes=[{fraction:2}]"], "study.regimes[0]: fraction must be in (0, 1], got 2.0"),
        (["study=smoke", "study.overrides=['train.epoch=1']"], "study: the run jobs of synthetic at 1% do not compose"),
        (["study=smoke", "run=['labels.fractoin=0.1']"], "do not compose"),
        (
            ["study=smoke", "study.overrides=['preset=smoke','evaluation.split=dev']"],
            "study: evaluation.split=dev: a study's claims are judged on the test split",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.inputs=adde"],
            "study.claims[1].inputs: 'adde' is not an input set of this study; sets: main, added",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.method=concat"],
            "study.claims[1].method: 'concat' never runs on input set added",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.reference=concat", "study.claims.1.reference_inputs=added"],
            "study.claims[1].reference: 'concat' never runs on input set added as a reference",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.reference_inputs=null"],
            "only methods over the same inputs pair, unless the claim names both sides' input sets",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.reference_inputs=added"],
            "study.claims[1]: method and reference are both attention on added",
        ),
        (
            ["study=smoke_inputs", "study.claims.1.reference=best-single"],
            "study.claims[1]: best-single is chosen among the single heads over the main set",
        ),
        (
            ["study=smoke_inputs", "study.input_sets.added.pretexts=[rotation,rotation]"],
            "study.input_sets.added.pretexts must be a non-empty list without repeats",
        ),
        (
            ["study=smoke_inputs", "study.input_sets.added.pretexts=[rotation]"],
            "study.input_sets.added.pretexts: rotation+random are the inputs of main already",
        ),
        (
            ["study=smoke_inputs", "study.input_sets.added.pretexts=[rotation,random]"],
            "study.input_sets.added.pretexts: random is a control, which every set fuses already",
        ),
        (
            ["study=smoke_inputs", "study.input_sets.added.heads=[single]"],
            "study.input_sets.added.heads: single does not fuse the set's pretexts in one head",
        ),
        (
            ["study=smoke_inputs", "study.input_sets.added.heads=[atention]"],
            "unknown fusion 'atention' in study.input_sets.added.heads",
        ),
        (
            ["study=smoke_inputs", "study.head_overrides=['fusion.scren=false']"],
            "study.head_overrides: fusion.scren: Key 'scren' not in 'AttentionConfig'",
        ),
        (
            ["study=smoke_inputs", "study.head_overrides=['screen=false']"],
            "study.head_overrides: 'screen=false' is not fusion.<option>=<value>",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value) or "no study",
)
def test_a_bad_study_is_refused_in_one_line_before_any_work(overrides, message):
    refused = refusal(*overrides)
    assert "\n" not in refused
    assert message in refused, refused


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF_DIR / "study").glob("*.yaml")))
def test_every_shipped_study_passes_its_checks(name):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="study", overrides=[f"study={name}"])
        plan = check_study(cfg.study)
        check_jobs(plan, [])
    titles = {
        inputs.name: {"best-single", *(title for keys in inputs.expected.values() for title, _ in keys)}
        for inputs in plan.inputs
    }
    assert plan.claims and all(
        side.method in titles[side.inputs] for claim in plan.claims for side in (claim.method, claim.reference)
    )


@pytest.mark.slow
@pytest.mark.parametrize("override", ["study.claims.0.reference=ensemble", "study.claims.0.margin=abc"])
def test_the_cli_refuses_a_bad_study_in_one_line_and_writes_nothing(tmp_path, override):
    proc = sslfuse("study", "study=smoke", override, "hydra.run.dir=verdicts", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("sslfuse study: error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "verdicts" / "verdicts.md").exists()


@pytest.mark.parametrize(
    ("direction", "margin", "low", "high", "expected"),
    [
        ("greater", 0.0, 0.5, 2.0, MET),
        ("greater", 0.0, -1.0, 2.0, INCONCLUSIVE),
        ("greater", 1.0, -2.0, 1.0, NOT_MET),
        ("greater", -2.0, -1.5, 0.3, MET),  # non-inferiority: no worse than 2 points
        ("less", 0.0, -3.0, -0.1, MET),
        ("less", 0.0, 0.0, 1.0, NOT_MET),
        ("less", 0.0, -1.0, 1.0, INCONCLUSIVE),
        ("equivalent", 1.0, -0.5, 0.9, MET),
        ("equivalent", 1.0, 1.0, 3.0, NOT_MET),
        ("equivalent", 1.0, -4.0, -1.0, NOT_MET),
        ("equivalent", 1.0, -0.5, 1.5, INCONCLUSIVE),
        ("greater", 0.0, math.nan, math.nan, INCONCLUSIVE),
    ],
)
def test_the_verdict_rule(direction, margin, low, high, expected):
    assert verdict(direction, margin, low, high) == expected


def fake_result(
    title: str,
    encoder_seed: int,
    seed: int,
    accuracy: float,
    regime: str = "1%",
    pretexts: tuple[str, ...] = ("a", "b"),
) -> FuseResult:
    return FuseResult(
        method=f"{title}({'+'.join(pretexts)})",
        title=title,
        family=title,
        options={},
        pretexts=list(pretexts),
        labels={"regime": regime, "seed": seed},
        metrics={"test_accuracy": accuracy},
        dataset="synthetic",
        encoder="small_cnn",
        encoder_seed=encoder_seed,
    )


def fake_results() -> pd.DataFrame:
    """3 encoder seeds × 4 label seeds: attention 5 points above concat, mean 5 below, each with some noise."""
    noise = np.random.default_rng(0).normal(0, 0.5, (2, 3, 4))
    results = []
    for e in range(3):
        for s in range(4):
            base = 0.80 + 0.01 * e + 0.005 * s
            results += [
                fake_result("concat", e, s, base),
                fake_result("attention", e, s, base + 0.05 + noise[0, e, s] / 100),
                fake_result("mean", e, s, base - 0.05 + noise[1, e, s] / 100),
            ]
    return results_frame(results)


def on_main(*configs: ClaimConfig) -> list[Claim]:
    """Claims whose two sides read the fake results' pretexts, a and b."""
    read = frozenset({"a", "b"})
    return [Claim(c, Side(c.method, MAIN, read), Side(c.reference, MAIN, read)) for c in configs]


def test_each_claim_gets_its_estimate_holm_interval_and_verdict():
    claims = on_main(
        ClaimConfig("attention", "concat", "1%", 1.0, "greater"),
        ClaimConfig("mean", "concat", "1%", 0.0, "greater"),
        ClaimConfig("attention", "concat", "5/class", 0.0, "greater"),
    )
    verdicts = judge(fake_results(), claims)
    assert verdicts["verdict"].tolist() == [MET, NOT_MET, INCONCLUSIVE]
    assert verdicts["note"].tolist() == ["", "", "no paired results"]
    assert verdicts["estimate"].iloc[0] == pytest.approx(5.0, abs=0.5)
    assert verdicts["estimate"].iloc[1] == pytest.approx(-5.0, abs=0.5)
    paired = verdicts.iloc[:2]
    assert (paired["holm_low"] < paired["estimate"]).all() and (paired["estimate"] < paired["holm_high"]).all()
    assert paired["holm_confidence"].max() == 0.975  # Holm over the two claims with results: one family of two
    assert paired["pairs"].tolist() == ["12 (3×4)", "12 (3×4)"]
    assert paired["p_improvement"].tolist() == [1.0, 0.0]


def test_a_claim_naming_datasets_is_judged_on_those_only():
    """Two datasets whose attention − concat differ in sign: a claim on one dataset pairs that dataset's 12 results
    only, with that dataset's estimate; a claim naming none gets a row per dataset."""
    other = fake_results().assign(dataset="digits", dataset_name="digits")
    other["test_accuracy"] = other["test_accuracy"] - np.where(other["title"] == "attention", 0.10, 0.0)
    both = pd.concat([fake_results(), other], ignore_index=True)
    verdicts = judge(both, on_main(ClaimConfig("attention", "concat", "1%", 0.0, "greater", datasets=["digits"])))
    assert verdicts["dataset"].tolist() == ["digits"]
    assert verdicts["estimate"].iloc[0] == pytest.approx(-5.0, abs=0.5)
    assert verdicts["verdict"].tolist() == [NOT_MET]
    every = judge(both, on_main(ClaimConfig("attention", "concat", "1%", 0.0, "greater")))
    assert sorted(every["dataset"]) == ["digits", "synthetic"]


def test_at_a_margin_of_0_the_verdict_intervals_are_the_reports_primary_ones():
    """The claims' Holm adjustment is ``sslfuse report --primary``'s when every margin is 0."""
    claims = on_main(
        ClaimConfig("attention", "concat", "1%", 0.0, "greater"),
        ClaimConfig("mean", "concat", "1%", 0.0, "less"),
    )
    verdicts = judge(fake_results(), claims)
    report = paired_differences(fake_results(), ["concat"], [Primary("attention", "concat"), Primary("mean", "concat")])
    report = report.set_index("method_title").loc[["attention", "mean"]]
    assert verdicts["p_holm"].to_numpy() == pytest.approx(report["p (Holm)"].to_numpy(), rel=1e-9)
    # the same intervals, up to the bootstrap's own noise
    assert verdicts["holm_low"].to_numpy() == pytest.approx(report["holm_low"].to_numpy(), abs=0.006)
    assert verdicts["holm_high"].to_numpy() == pytest.approx(report["holm_high"].to_numpy(), abs=0.006)


def test_a_claim_against_a_margin_is_tested_against_the_margin():
    """The Holm level follows each claim's test of its margin: an effect of about 5 points claimed beyond 4.9 is not
    adjusted as if tested against 0."""
    verdicts = judge(
        fake_results(),
        on_main(
            ClaimConfig("attention", "concat", "1%", 4.9, "greater"), ClaimConfig("mean", "concat", "1%", 0.0, "less")
        ),
    )
    near = verdicts.iloc[0]
    assert near["p_margin"] > 0.05 and near["verdict"] == INCONCLUSIVE
    assert near["holm_low"] < 4.9 < near["holm_high"]


def test_a_cross_set_claim_pairs_the_same_head_over_two_input_sets():
    """attention over a+b+c against attention over a+b, on the same encoder and label seeds: the estimate is the mean
    of the paired differences computed here; a claim on the main set is not paired with the other set's results."""
    noise = np.random.default_rng(1).normal(0, 0.01, (3, 4))
    results = [
        fake_result(title, e, s, accuracy, pretexts=pretexts)
        for e in range(3)
        for s in range(4)
        for title, accuracy, pretexts in (
            ("attention", 0.80 + 0.01 * s, ("a", "b")),
            ("concat", 0.78 + 0.01 * s, ("a", "b")),
            ("attention", 0.79 + 0.01 * s + noise[e, s], ("a", "b", "c")),
            ("concat", 0.10, ("a", "b", "c")),
        )
    ]
    frame = results_frame(results)
    main, wide = frozenset({"a", "b"}), frozenset({"a", "b", "c"})
    cross = ClaimConfig("attention", "attention", "1%", -0.3, "greater", inputs="wide", reference_inputs=MAIN)
    within = ClaimConfig("attention", "concat", "1%", 0.0, "greater")
    verdicts = judge(
        frame,
        [
            Claim(cross, Side("attention", "wide", wide), Side("attention", MAIN, main)),
            Claim(within, Side("attention", MAIN, main), Side("concat", MAIN, main)),
        ],
    )
    accuracy = frame.set_index(["encoder_seed", "seed", "method"])["test_accuracy"] * 100
    direct = np.mean(
        [
            accuracy[(str(e), s, "attention(a+b+c)")] - accuracy[(str(e), s, "attention(a+b)")]
            for e in range(3)
            for s in range(4)
        ]
    )
    assert verdicts["estimate"].iloc[0] == pytest.approx(direct, abs=1e-9)
    assert verdicts["statement"].tolist() == [
        "attention@wide − attention@main > -0.3 at 1%",
        "attention − concat > 0 at 1%",
    ]
    assert verdicts[["inputs", "reference_inputs"]].values.tolist() == [["wide", "main"], ["main", "main"]]
    assert verdicts["estimate"].iloc[1] == pytest.approx(2.0)  # concat over a+b+c never pairs with attention over a+b
    assert verdicts["pairs"].tolist() == ["12 (3×4)", "12 (3×4)"]


def test_head_overrides_reach_every_head_of_every_set_and_make_another_study():
    """``fusion.screen=false`` names every head of every set as the results will (``attention[screen=False]``),
    enters the run jobs' settings, and the claims record: the same claims with the screen off hash differently."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        plain = check_study(compose(config_name="study", overrides=["study=smoke_inputs"]).study)
        screen_off = check_study(
            compose(
                config_name="study", overrides=["study=smoke_inputs", "study.head_overrides=['fusion.screen=false']"]
            ).study
        )
    assert [(c.method.method, c.reference.method) for c in screen_off.claims] == [
        ("attention[screen=False]", "concat[screen=False]"),
        ("attention[screen=False]", "attention[screen=False]"),
    ]
    assert (
        screen_off.conditions["head_overrides"] == ["fusion.screen=false"] and "head_overrides" not in plain.conditions
    )
    cell = plain.cells[0]
    assert "head_overrides=['fusion.screen=false']" in cell_overrides(screen_off, cell, screen_off.inputs[1])
    assert cell_overrides(plain, cell, plain.main) != cell_overrides(screen_off, cell, screen_off.main)


def test_claims_without_input_sets_hash_as_before_sets_existed(tmp_path):
    """The record of a study whose claims name no set is the five keys only, so a study declared before input sets
    existed needs no amendment."""
    record = declare(tmp_path, CLAIMS, 0, None)
    five = {key: getattr(CLAIMS[0], key) for key in ("method", "reference", "regime", "margin", "direction")}
    assert record["versions"][0]["claims"] == [five]
    assert record["versions"][0]["sha256"] == hashlib.sha256(json.dumps([five], sort_keys=True).encode()).hexdigest()


CLAIMS = [ClaimConfig("attention", "concat", "1%", 0.0, "greater")]


def test_claims_are_recorded_and_changing_them_after_results_needs_an_amendment(tmp_path):
    first = declare(tmp_path, CLAIMS, 0, None)
    changed = [dataclasses.replace(CLAIMS[0], margin=1.0)]
    assert declare(tmp_path, changed, 0, None)["versions"][0]["claims"][0]["margin"] == 1.0  # no results: replaced
    declare(tmp_path, CLAIMS, 0, None)
    assert declare(tmp_path, CLAIMS, 5, None) == first | {"versions": first["versions"]}  # unchanged: accepted
    with pytest.raises(UserError, match=r"differ from the claims declared in .* and 5 result\(s\) exist; .* amend="):
        declare(tmp_path, changed, 5, None)
    assert len(json.loads((tmp_path / CLAIMS_FILE).read_text())["versions"]) == 1
    amended = declare(tmp_path, changed, 5, "a margin of 1 point is what matters")
    assert [v["amendment"] for v in amended["versions"]] == [None, "a margin of 1 point is what matters"]
    assert amended["versions"][1]["results_before"] == 5
    assert json.loads((tmp_path / CLAIMS_FILE).read_text()) == amended
    (tmp_path / CLAIMS_FILE).unlink()
    with pytest.raises(UserError, match="no declared claims"):
        declare(tmp_path, CLAIMS, 5, None)


def test_an_amended_verdict_page_says_so_and_shows_both_versions(tmp_path):
    declare(tmp_path, CLAIMS, 0, None)
    changed = [dataclasses.replace(CLAIMS[0], margin=1.0)]
    versions = declare(tmp_path, changed, 12, "why")["versions"]
    md_path, csv_path = write_verdicts(
        tmp_path, "demo", judge(fake_results(), on_main(*changed)), versions, "Design: a test."
    )
    page = md_path.read_text()
    assert "**Amended.**" in page and "latest reason: why" in page
    assert "### Version 1 (as first declared)" in page and "### Version 2 (amendment: why)" in page
    assert all(version["sha256"] in page for version in versions)
    assert pd.read_csv(csv_path)["statement"].tolist() == ["attention − concat > 1 at 1%"]
    unamended, _ = write_verdicts(tmp_path, "demo", judge(fake_results(), on_main(*CLAIMS)), versions[:1], "")
    assert "Amended" not in unamended.read_text()


def test_claims_first_declared_after_results_existed_are_shown_as_an_amendment(tmp_path):
    """A claims file removed while results exist and declared again with ``amend``: one version, and an amendment."""
    versions = declare(tmp_path, CLAIMS, 12, "the claims file was lost")["versions"]
    assert len(versions) == 1
    page = write_verdicts(tmp_path, "demo", judge(fake_results(), on_main(*CLAIMS)), versions, "")[0].read_text()
    assert "**Amended.**" in page and "### Version 1 (amendment: the claims file was lost)" in page


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> tuple[Path, str]:
    """A folder where ``sslfuse study study=smoke`` has run once, and what it printed."""
    folder = tmp_path_factory.mktemp("study")
    return folder, sslfuse("study", "study=smoke", "hydra.run.dir=first", cwd=folder).stdout


def result_files(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in (folder / "outputs/studies/smoke/results").rglob("results.json")}


@pytest.mark.slow
def test_the_smoke_study_runs_end_to_end_and_writes_its_verdicts(smoke_study):
    folder, printed = smoke_study
    verdicts = pd.read_csv(folder / "first" / "verdicts.csv")
    assert verdicts["statement"].tolist() == [
        "attention − concat > 0 at 1%",
        "attention − select[by=val] within ±5 at 1%",
    ]
    assert set(verdicts["verdict"]) <= {MET, NOT_MET, INCONCLUSIVE}
    assert (verdicts["pairs"] == "4 (2×2)").all() and verdicts["holm_low"].notna().all()
    assert (verdicts["resampled"] == "2 encoder seeds × 2 label seeds, 256 test images").all()  # predictions kept
    assert "claim 1: attention − concat > 0 at 1%" in printed and "verdicts written to" in printed
    page = (folder / "first" / "verdicts.md").read_text()
    assert "Holm 95% interval" in page and "Amended" not in page
    results = result_files(folder)
    assert len(results) == 2 * 2 * 3  # encoder seeds × label seeds × methods
    record = folder / "outputs/studies/smoke" / CLAIMS_FILE
    assert json.loads(record.read_text())["versions"][0]["results_before"] == 0
    assert record.stat().st_mtime_ns <= min(results.values())  # declared before the first fuse


@pytest.mark.slow
def test_a_rerun_of_the_study_computes_nothing_new(smoke_study):
    folder, _ = smoke_study
    before = result_files(folder)
    printed = sslfuse("study", "study=smoke", "hydra.run.dir=again", cwd=folder).stdout
    assert "nothing to run" in printed
    assert result_files(folder) == before
    assert pd.read_csv(folder / "again" / "verdicts.csv").equals(pd.read_csv(folder / "first" / "verdicts.csv"))


@pytest.mark.slow
def test_the_cli_refuses_changed_claims_after_results_unless_amended(smoke_study, tmp_path):
    shutil.copytree(smoke_study[0] / "outputs" / "studies", tmp_path / "outputs" / "studies")
    record = tmp_path / "outputs/studies/smoke" / CLAIMS_FILE
    declared = record.read_text()
    refused = sslfuse(
        "study", "study=smoke", "study.claims.0.margin=-2", "hydra.run.dir=refused", cwd=tmp_path, check=False
    )
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "amend=" in refused.stderr and record.read_text() == declared
    amended = sslfuse(
        "study",
        "study=smoke",
        "study.claims.0.margin=-2",
        "amend='non-inferiority is the claim'",
        "hydra.run.dir=amended",
        cwd=tmp_path,
    )
    assert "nothing to run" in amended.stdout
    page = (tmp_path / "amended" / "verdicts.md").read_text()
    assert "**Amended.**" in page and "### Version 2 (amendment: non-inferiority is the claim)" in page
    assert "attention − concat > -2 at 1%" in page


@pytest.mark.slow
def test_a_cross_set_claim_is_judged_on_the_paired_predictions_of_its_two_sets(smoke_study, tmp_path):
    """``smoke_inputs`` with the screen off on every head: the added set runs in jobs of its own; the cross-set claim's
    estimate is the mean, over (encoder seed, label seed), of the two sets' attention accuracies computed here from
    their kept per-image predictions, on the same labeled images and test images; a rerun computes nothing new."""
    shutil.copytree(smoke_study[0] / "outputs" / "artifacts", tmp_path / "outputs" / "artifacts")  # the encoders
    screen_off = "study.head_overrides=['fusion.screen=false']"
    printed = sslfuse("study", "study=smoke_inputs", screen_off, "hydra.run.dir=first", cwd=tmp_path).stdout
    assert "input set added" in printed
    root = tmp_path / "outputs/studies/smoke_inputs"
    results = collect_results(root / "results")
    assert len(results) == 2 * 2 * 3  # encoder seeds × label seeds × (attention, concat on main; attention on added)
    assert all(options == {"screen": False} for options in results["options"])  # every head of every set
    correct = {}
    for _, row in results.iterrows():
        kept = Predictions.from_file(Path(row["result_dir"]) / row["predictions_file"])
        key = (row["family"], frozenset(row["pretexts"]), row["encoder_seed"], row["seed"])
        correct[key] = (kept.predicted == kept.labels, row["labeled_indices_sha256"], row["evaluation_sha256"])
    main, added = frozenset({"rotation", "random"}), frozenset({"rotation", "noise", "random"})
    differences = []
    for encoder_seed, seed in itertools.product(["0", "1"], [0, 1]):
        mine, theirs = (
            correct[("attention", added, encoder_seed, seed)],
            correct[("attention", main, encoder_seed, seed)],
        )
        assert mine[1:] == theirs[1:]  # the same labeled images, the same test images
        differences.append((mine[0].mean() - theirs[0].mean()) * 100)
    verdicts = pd.read_csv(tmp_path / "first" / "verdicts.csv")
    cross = verdicts.iloc[1]
    assert cross["statement"] == "attention[screen=False]@added − attention[screen=False]@main > -0.3 at 1%"
    assert cross["estimate"] == pytest.approx(np.mean(differences), abs=1e-9)
    assert cross["pairs"] == "4 (2×2)" and cross["resampled"] == "2 encoder seeds × 2 label seeds, 256 test images"
    assert cross["verdict"] in {MET, NOT_MET, INCONCLUSIVE}
    version = json.loads((root / CLAIMS_FILE).read_text())["versions"][0]
    assert version["head_overrides"] == ["fusion.screen=false"]
    assert version["input_sets"] == {"main": ["rotation", "random"], "added": ["rotation", "noise", "random"]}
    again = sslfuse("study", "study=smoke_inputs", screen_off, "hydra.run.dir=again", cwd=tmp_path).stdout
    assert "nothing to run" in again


def test_a_method_with_changed_options_is_planned_apart_from_its_default(tmp_path):
    """``attention`` and ``attention[scorer=uniform]`` share a family; with only the first's results on disk, the
    study still plans the second for every label seed, and nothing once both exist."""
    from ssl_fusion.stages.fuse import write_result
    from ssl_fusion.stages.study import missing_runs

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            config_name="study",
            overrides=["study=smoke", "study.references=[concat,select,'attention[scorer=uniform]']"],
        )
    plan = check_study(cfg.study)
    pretexts = plan.main.pretexts

    def write(title: str, name: str, seed: int) -> None:
        result = dataclasses.replace(fake_result(title, 0, seed, 0.8, pretexts=tuple(pretexts)), family=name)
        folder = tmp_path / f"{title}-{seed}"
        folder.mkdir()
        write_result(folder, result)

    for seed in plan.study.label_seeds:
        write("attention", "attention", seed)
        write("concat", "concat", seed)
        write("select[by=val]", "select", seed)
    fusions, seeds = missing_runs(plan, plan.main, tmp_path)
    assert fusions == ["attention[scorer=uniform]"] and seeds == list(plan.study.label_seeds)
    for seed in plan.study.label_seeds:
        write("attention[scorer=uniform]", "attention", seed)
    assert missing_runs(plan, plan.main, tmp_path) == ([], [])


def test_a_regime_naming_datasets_runs_on_those_only():
    """Two datasets, one regime each: two cells, not four, and each keeps the folder it has without the key."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="study", overrides=["study=paper_claims"])
    plan = check_study(cfg.study)
    assert [(cell.dataset, cell.regime_name) for cell in plan.cells] == [("fashion_mnist", "1%"), ("digits", "5/class")]
    crossed = check_study(
        OmegaConf.merge(cfg.study, {"regimes": [{"fraction": 0.01}, {"per_class": 5}], "claims": cfg.study.claims})
    )
    assert len(crossed.cells) == 4
    folders = {(c.dataset, c.regime_name): cell_folder(Path("s"), crossed, c, crossed.main) for c in crossed.cells}
    assert [cell_folder(Path("s"), plan, c, plan.main) for c in plan.cells] == [
        folders["fashion_mnist", "1%"],
        folders["digits", "5/class"],
    ]


def test_the_claims_record_shows_what_an_unset_input_set_or_dataset_list_means():
    """A claim without sets is on the main set, one without datasets on every dataset: the page says so, not nan."""
    from ssl_fusion.report.verdicts import versions_markdown

    claims = [
        ClaimConfig("attention", "concat", "1%", 0.0).declared(),
        ClaimConfig("attention", "attention", "1%", 0.0, inputs="weak", reference_inputs="main").declared(),
        ClaimConfig("attention", "concat", "5/class", 0.0, datasets=["digits"]).declared(),
    ]
    page = versions_markdown([{"sha256": "0", "declared": "now", "results_before": 0, "claims": claims}])
    assert "nan" not in page
    rows = [line for line in page.splitlines() if line.startswith("| attention")]
    assert [cell.strip() for cell in rows[0].split("|")[6:9]] == ["main", "main", "all"]
    assert [cell.strip() for cell in rows[1].split("|")[6:8]] == ["weak", "main"]
