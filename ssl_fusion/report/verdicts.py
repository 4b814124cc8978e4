"""The verdicts of a declared study (``sslfuse study``, ``docs/studies.md``): each claim's estimate, its Holm-adjusted
interval with the claims as the one primary family, P(improvement), and met / not met / inconclusive.

The paired rows come from ``paired.paired_differences``: the estimate, its design-aware standard error and degrees
of freedom, P(improvement) with its interval. The claims' rows form one family: each tests "the difference equals
the claim's margin" with the report's t (``statistics.p_value``), Holm adjusts them together (``statistics.holm``),
and each row's interval is taken at the level Holm tests it (``statistics.holm_confidence``, ``t_bounds``), so that
it excludes the margin exactly when Holm rejects. At a margin of 0 these are ``sslfuse report --primary``'s adjusted
p-values and intervals. The verdict reads the interval (``verdict``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, List, Optional

import pandas as pd
from omegaconf import MISSING

from ssl_fusion.report.paired import CORRECT, Side, interval_text, paired_sides
from ssl_fusion.report.results import correctness
from ssl_fusion.report.statistics import CONFIDENCE, holm, holm_confidence, p_value, t_bounds
from ssl_fusion.runtime.checks import Checked, Rule, one_of
from ssl_fusion.store.files import atomic_write_text

GREATER, LESS, EQUIVALENT = "greater", "less", "equivalent"
DIRECTIONS = (GREATER, LESS, EQUIVALENT)
CLAIM_KEYS = ("method", "reference", "regime", "direction", "margin")
INPUT_KEYS = ("inputs", "reference_inputs")
MAIN = "main"  # the input set of a study's ``pretexts``
MET, NOT_MET, INCONCLUSIVE = "met", "not met", "inconclusive"
RULE_TEXT = (
    "A claim is **met** when its Holm-adjusted 95% interval of method − reference (accuracy points) lies entirely "
    "on the claimed side of the margin: above it for `greater` (low > margin), below it for `less` (high < margin), "
    "inside (−margin, +margin) for `equivalent`. It is **not met** when the interval lies entirely on the other side: "
    "high ≤ margin for `greater`, low ≥ margin for `less`, wholly at or beyond ±margin for `equivalent`. Otherwise, "
    "or when there is no interval (fewer than two pairs, or nothing varies), it is **inconclusive**."
)


@dataclass
class ClaimConfig(Checked):
    """One declared claim: ``method`` − ``reference`` on the ``regime`` (a table's name: ``1%``, ``5/class``) is
    greater than / less than ``margin`` accuracy points, or within ±``margin`` of 0 (``equivalent``). ``inputs`` and
    ``reference_inputs`` name each side's input set (unset: the study's main set); only a claim that names both may
    pair methods over different inputs."""

    section: ClassVar[str] = "claim"
    method: str = MISSING
    reference: str = MISSING
    regime: str = MISSING
    margin: float = MISSING
    direction: str = GREATER
    inputs: Optional[str] = None
    reference_inputs: Optional[str] = None
    datasets: List[str] = field(default_factory=list)  # the datasets it is judged on; empty: every one of the study

    def rules(self) -> dict[str, Rule]:
        return {
            "margin": Rule(math.isfinite, "a finite number of accuracy points", math.nan),
            "direction": one_of(DIRECTIONS),
        }

    def sides(self) -> tuple[str, str]:
        """The two sides as tables name them: ``attention``, or with their input sets where the claim names a set
        (``attention@harmful``, ``attention@main``)."""
        if self.inputs is None and self.reference_inputs is None:
            return self.method, self.reference
        return f"{self.method}@{self.inputs or MAIN}", f"{self.reference}@{self.reference_inputs or MAIN}"

    def text(self) -> str:
        """The claim in words: ``attention − concat > 0 at 1%``, ``attention@harmful − attention@main > -0.3 at 1%``."""
        difference = " − ".join(self.sides())
        claim = {
            GREATER: f"{difference} > {self.margin:g}",
            LESS: f"{difference} < {self.margin:g}",
            EQUIVALENT: f"{difference} within ±{self.margin:g}",
        }[self.direction]
        return f"{claim} at {self.regime}"

    def declared(self) -> dict[str, Any]:
        """The claim as the claims record keeps and hashes it: its keys, an unset input set left out (so that a
        claim without sets hashes as claims did before sets existed)."""
        fields = dataclasses.asdict(self).items()
        return {
            key: value
            for key, value in fields
            if (value is not None or key not in INPUT_KEYS) and (value != [] or key != "datasets")
        }


@dataclass(frozen=True)
class Claim:
    """A checked claim: as declared, with its methods named as the results name them, and the two sides it pairs."""

    config: ClaimConfig
    method: Side
    reference: Side


def verdict(direction: str, margin: float, low: float, high: float) -> str:
    """Met / not met / inconclusive for an interval [low, high] (the rule of ``RULE_TEXT``)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if direction == GREATER:
        return MET if low > margin else NOT_MET if high <= margin else INCONCLUSIVE
    if direction == LESS:
        return MET if high < margin else NOT_MET if low >= margin else INCONCLUSIVE
    if -margin < low and high < margin:
        return MET
    return NOT_MET if low >= margin or high <= -margin else INCONCLUSIVE


def boundary(claim: ClaimConfig, estimate: float) -> float:
    """The value a claim's test compares the difference with: its margin, or for ``equivalent`` the end of
    (−margin, +margin) nearer the estimate (the interval lies inside the band exactly when it excludes that end)."""
    if claim.direction == EQUIVALENT:
        return claim.margin if estimate >= 0 else -claim.margin
    return claim.margin


def adjust(family: pd.DataFrame, claims: list[ClaimConfig]) -> pd.DataFrame:
    """Holm over the claims' rows as one family, each row testing "the difference equals its claim's boundary"
    (``boundary``) with the report's t on the design-aware standard error (``statistics.p_value``); each row's
    interval at the level Holm tests it (``holm_confidence``), which excludes the boundary exactly when Holm rejects.
    At a margin of 0 these are ``sslfuse report --primary``'s adjusted p-values and intervals."""
    spec = [claims[number - 1] for number in family["claim"]]
    tested = [
        p_value(d - boundary(c, d), se, df)
        for c, d, se, df in zip(spec, family["difference"], family["standard_error"], family["df"])
    ]
    adjusted = holm(tested)
    levels = holm_confidence(tested, adjusted, CONFIDENCE)
    bounds = [
        t_bounds(d, se, df, level) if not math.isnan(level) else (math.nan, math.nan)
        for d, se, df, level in zip(family["difference"], family["standard_error"], family["df"], levels)
    ]
    return family.assign(
        p_margin=tested,
        p_holm=adjusted,
        holm_confidence=levels,
        holm_low=[b[0] for b in bounds],
        holm_high=[b[1] for b in bounds],
    )


def judged_on(results: pd.DataFrame, claim: ClaimConfig) -> pd.DataFrame:
    """The results a claim is judged on: its regime's, of its datasets (all where it names none)."""
    rows = results["regime"] == claim.regime
    if claim.datasets:
        rows &= results["dataset_name"].isin(claim.datasets)
    return results[rows]


def judge(results: pd.DataFrame, claims: list[Claim]) -> pd.DataFrame:
    """One row per claim and dataset: the estimate, its interval Holm-adjusted with the claims' rows as one family
    (``adjust``), P(improvement) with its unadjusted interval, and the verdict; a claim without paired results gets
    one inconclusive row that says so. ``results``: the report's frame (``results_frame``), scored on test; where
    its rows name their folders, the kept predictions give the intervals their test-image level. Each claim pairs
    its two sides (``paired.paired_sides``), each over its own input set, on its regime."""
    if CORRECT not in results:
        results = results.assign(**{CORRECT: correctness(results)})
    parts = [
        paired_sides(judged_on(results, claim.config), claim.method, claim.reference).assign(claim=number)
        for number, claim in enumerate(claims, start=1)
    ]
    found = [part for part in parts if not part.empty]
    specs = [claim.config for claim in claims]
    family = adjust(pd.concat(found, ignore_index=True), specs) if found else pd.DataFrame()
    missing = pd.DataFrame(
        [
            {"claim": number, "pairs": "0", "note": "no paired results"}
            for number, part in enumerate(parts, start=1)
            if part.empty
        ]
    )
    return verdict_table(pd.concat([family, missing], ignore_index=True), specs)


def verdict_table(table: pd.DataFrame, claims: list[ClaimConfig]) -> pd.DataFrame:
    """``judge``'s rows with the claim's fields and the verdict, in claim order (``verdicts.csv``)."""
    blank = {"dataset": "", "encoder": "", "resampled": "", "note": ""}
    for column in (
        "holm_low",
        "holm_high",
        "holm_confidence",
        "p_margin",
        "p_holm",
        "difference",
        "p_improvement",
        "p_improvement_low",
        "p_improvement_high",
        *blank,
    ):
        if column not in table:
            table[column] = blank.get(column, math.nan)
    table = table.sort_values("claim", kind="stable").reset_index(drop=True).fillna(blank)
    spec = [claims[number - 1] for number in table["claim"]]
    low, high = table["holm_low"].astype(float), table["holm_high"].astype(float)
    return pd.DataFrame(
        {
            "claim": table["claim"],
            "statement": [c.text() for c in spec],
            "dataset": table["dataset"],
            "encoder": table["encoder"],
            "method": [c.method for c in spec],
            "inputs": [c.inputs or MAIN for c in spec],
            "reference": [c.reference for c in spec],
            "reference_inputs": [c.reference_inputs or MAIN for c in spec],
            "regime": [c.regime for c in spec],
            "direction": [c.direction for c in spec],
            "margin": [c.margin for c in spec],
            "pairs": table["pairs"],
            "estimate": table["difference"].astype(float),
            "holm_low": low,
            "holm_high": high,
            "holm_confidence": table["holm_confidence"].astype(float),
            "p_margin": table["p_margin"].astype(float),
            "p_holm": table["p_holm"].astype(float),
            "p_improvement": table["p_improvement"].astype(float),
            "p_improvement_low": table["p_improvement_low"].astype(float),
            "p_improvement_high": table["p_improvement_high"].astype(float),
            "resampled": table["resampled"],
            "verdict": [verdict(c.direction, c.margin, lo, hi) for c, lo, hi in zip(spec, low, high)],
            "note": table["note"],
        }
    )


def p_text(p: float) -> str:
    return "–" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def shown(verdicts: pd.DataFrame) -> pd.DataFrame:
    """The verdicts as the Markdown page and the terminal show them."""
    improvement = [
        ("–" if math.isnan(p) else f"{p:.2f}") + ("" if math.isnan(lo) else f" {interval_text(lo, hi)}")
        for p, lo, hi in zip(verdicts["p_improvement"], verdicts["p_improvement_low"], verdicts["p_improvement_high"])
    ]
    view = pd.DataFrame(
        {
            "#": verdicts["claim"],
            "claim": verdicts["statement"],
            "dataset": verdicts["dataset"],
            "pairs": verdicts["pairs"],
            "estimate": verdicts["estimate"].map(lambda d: "–" if math.isnan(d) else f"{d:+.2f}"),
            "Holm 95% interval": [interval_text(lo, hi) for lo, hi in zip(verdicts["holm_low"], verdicts["holm_high"])],
            "p vs margin (Holm)": verdicts["p_holm"].map(p_text),
            "P(improvement)": [text.replace("+", "") for text in improvement],
            "verdict": verdicts["verdict"] + verdicts["note"].map(lambda note: f" ({note})" if note else ""),
        }
    )
    return view.drop(columns="dataset") if verdicts["dataset"].nunique() <= 1 else view


def claim_columns(claims: list[dict[str, Any]]) -> list[str]:
    """The claims record's columns: the five keys, and the input sets and datasets where a claim names them."""
    return [*CLAIM_KEYS, *(key for key in (*INPUT_KEYS, "datasets") if any(key in claim for claim in claims))]


def versions_markdown(versions: list[dict[str, Any]]) -> str:
    """Each declared version of the claims, the first as declared and each amendment with its reason, with the input
    sets its claims name and the head options it holds under."""
    text = ""
    for number, version in enumerate(versions, start=1):
        kind = f"amendment: {version['amendment']}" if version.get("amendment") else "as first declared"
        text += (
            f"\n### Version {number} ({kind})\n\nsha256 `{version['sha256']}`, declared {version['declared']}"
            f" with {version['results_before']} result(s) present.\n\n"
            + pd.DataFrame(version["claims"], columns=claim_columns(version["claims"]))
            .fillna({**{key: MAIN for key in INPUT_KEYS}, "datasets": "all"})  # what an unset key means
            .to_markdown(index=False)
            + "\n"
            + "".join(
                f"\nInput set {name}: {', '.join(pretexts)}.\n"
                for name, pretexts in version.get("input_sets", {}).items()
            )
            + (f"\nEvery head with {', '.join(version['head_overrides'])}.\n" if version.get("head_overrides") else "")
        )
    return text


def write_verdicts(
    folder: Path, study: str, verdicts: pd.DataFrame, versions: list[dict[str, Any]], design: str
) -> tuple[Path, Path]:
    """``verdicts.md`` and ``verdicts.csv`` in ``folder``; ``versions``: the declared claims, oldest first (any of them
    an amendment, even the only one, e.g. claims declared after results existed: the page says the claims were
    amended and shows every version); ``design``: the study in a sentence."""
    current = versions[-1]
    amendments = sum(bool(version.get("amendment")) for version in versions)
    amended = amendments > 0
    banner = (
        f"\n**Amended.** The claims were changed after results existed ({amendments} amendment(s); "
        f"latest reason: {current['amendment']}). The verdicts below judge the amended claims; every version "
        "is shown at the end.\n"
        if amended
        else ""
    )
    markdown = (
        f"# Study {study}: verdicts\n\n{design}\n\nClaims sha256 `{current['sha256']}`, declared "
        f"{current['declared']}.\n{banner}\n"
        "Estimate: mean paired difference method − reference in accuracy points, over results that share the encoder "
        "seed and the label seed. The claims are the primary family: each tests whether the difference equals its "
        "margin (for `equivalent`, the end of ±margin nearer the estimate), and Holm adjusts the tests together; "
        "each interval is the design-aware interval at the level Holm tests it, so it excludes the margin exactly "
        "when Holm rejects (docs/studies.md, docs/statistics.md). P(improvement): the share of paired runs the method "
        "wins, with its unadjusted 95% interval.\n\n"
        + RULE_TEXT
        + "\n\n"
        + shown(verdicts).to_markdown(index=False)
        + "\n"
        + (
            "\nResampled: " + "; ".join(sorted(set(verdicts["resampled"]) - {""})) + ".\n"
            if (verdicts["resampled"] != "").any()
            else ""
        )
        + f"\n## Declared claims\n{versions_markdown(versions)}"
    )
    md_path, csv_path = folder / "verdicts.md", folder / "verdicts.csv"
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, verdicts.to_csv(index=False))
    return md_path, csv_path
