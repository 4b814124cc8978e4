"""Paired differences: each method against reference methods on the same labeled subsets and the same encoders.

Two results form a pair when they share dataset, encoder, encoder seed, label regime, label seed and pretext set:
the same labeled images fed to the same frozen encoders, so the seed-to-seed spread that both share cancels in
their difference. Results without such a partner are left out, never paired with another seed's.

The reference ``best-single`` is, for each encoder seed, label seed and regime, the ``single`` head whose pretext had
the best cross-validation accuracy on that run's own labeled images: chosen with the labels one run has, never on
test.
Other references are named by a method's ``title`` (``concat``, ``select[by=val]``).

Each row's interval and P(method > reference) resample what the study randomised: encoder seeds, label seeds and,
where both methods' per-image correctness was kept (``CORRECT``), test images (``statistics.py``,
``docs/statistics.md``). Comparisons named primary (``--primary=method:reference``) are Holm-adjusted as a family;
every other row is exploratory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ssl_fusion.report.results import VARIANT
from ssl_fusion.report.statistics import CONFIDENCE, compare, holm, holm_confidence, t_bounds
from ssl_fusion.runtime.errors import UserError

BEST_SINGLE = "best-single"
DEFAULT_REFERENCES = ("concat", "select[by=val]", BEST_SINGLE)
PAIR_KEYS = ["encoder_seed", "seed"]
GROUP_KEYS = ["dataset", "encoder", "regime"]
CORRECT = "test_correct"  # per result, where kept: 0/1 per test image, in the test split's order
PRIMARY, EXPLORATORY = "primary", "exploratory"
NUMBERS_ONLY = (
    "low",
    "high",
    "standard_error",
    "df",
    "p_improvement",
    "p_improvement_low",
    "p_improvement_high",
    "holm_confidence",
    "holm_low",
    "holm_high",
    "method_title",
    "reference_title",
)  # CSV, not Markdown


@dataclass(frozen=True)
class Primary:
    """A primary comparison: a method (its title, ``attention``, or its label, ``attention(a+b)``) minus a
    reference (a title or ``best-single``)."""

    method: str
    reference: str

    def __str__(self) -> str:
        return f"{self.method}:{self.reference}"


def parse_primaries(text: str) -> list[Primary]:
    """``method:reference[,method:reference...]``; commas and colons inside ``[...]`` (a method's options) belong
    to the name. A ValueError when an item has no method or no reference."""
    primaries = []
    for item in re.split(r",(?![^\[]*\])", text):
        method, _, reference = item.rpartition(":")
        if not method or not reference:
            raise ValueError(f"'{item}' is not method:reference")
        primaries.append(Primary(method, reference))
    return primaries


def check_references(results: pd.DataFrame, references: list[str]) -> None:
    """Each reference must be a method's title present in the results, or ``best-single``."""
    present = sorted(set(results["title"]))
    for reference in references:
        if reference != BEST_SINGLE and reference not in present:
            raise UserError(
                f"report: reference '{reference}' is not among the results' methods; "
                f"valid: {', '.join([*present, BEST_SINGLE])}"
            )


def best_single(group: pd.DataFrame, pretexts: list[str]) -> tuple[pd.DataFrame, str] | None:
    """Per encoder seed and label seed, the ``single`` result (among ``pretexts``, any variant: options, cached views)
    with the best cross-validation accuracy on that run's own labeled images; ties go to the lower cross-validation
    loss, then to the pretext first in name order. None when no single head ran or none has a cross-validation
    score (a run with a class of one labeled image has none: its label seed has no best single)."""
    singles = group[(group["family"] == "single") & group["pretext_set"].isin(pretexts)]
    if "cv_accuracy" not in singles or singles["cv_accuracy"].isna().all():
        return None
    loss = singles["cv_nll"] if "cv_nll" in singles else pd.Series(np.nan, index=singles.index)
    scored = singles.assign(cv_score=singles["cv_accuracy"].astype(float), cv_loss=loss.astype(float).fillna(np.inf))
    ranked = scored.dropna(subset=["cv_score"]).sort_values(
        ["cv_score", "cv_loss", "pretext_set"], ascending=[False, True, True], kind="stable"
    )
    chosen = ranked.drop_duplicates(PAIR_KEYS).drop(columns=["cv_score", "cv_loss"])
    return chosen, "+".join(sorted(set(chosen["pretext_set"])))


def reference_rows(group: pd.DataFrame, reference: str, mine: pd.Series) -> tuple[pd.DataFrame, str] | None:
    """The results ``mine`` (one method's) pairs with under ``reference``, and how the reference is named."""
    if reference == BEST_SINGLE:
        found = best_single(group, mine["pretexts_list"])
        return None if found is None else (found[0], f"best single on validation ({found[1]})")
    rows = group[(group["title"] == reference) & (group["pretext_set"] == mine["pretext_set"])]
    return (rows, reference) if not rows.empty else None


@dataclass(frozen=True)
class Side:
    """One side of a declared comparison: a method (its title, its label, or ``best-single``) over a named input
    set, ``pretexts`` being what its results record (empty for a method that reads the images)."""

    method: str
    inputs: str
    pretexts: frozenset[str]

    def named(self, results: pd.DataFrame) -> pd.DataFrame:
        """This side's results among ``results``: the method, over exactly these pretexts (``best-single``: the
        single results over one of them)."""
        read = results["pretexts"].map(frozenset) == self.pretexts
        return results[((results["title"] == self.method) | (results["method"] == self.method)) & read]

    def __str__(self) -> str:
        return f"{self.method}@{self.inputs}"


def paired_sides(results: pd.DataFrame, mine: Side, theirs: Side) -> pd.DataFrame:
    """``mine`` − ``theirs``, one row per (dataset, encoder, regime) with at least one pair, as ``paired_differences``
    gives them, the difference not rounded: the two sides may read different inputs (the same head with and without
    an encoder), and pair on the encoder seed, the label seed and, where both kept them, the test images."""
    results = results.assign(accuracy=results["test_accuracy"] * 100)
    rows = []
    for (dataset, encoder, regime), group in results.groupby(GROUP_KEYS, sort=False):
        found = best_single(group, sorted(mine.pretexts)) if theirs.method == BEST_SINGLE else None
        reference, other = (
            (f"best single on validation ({found[1]})", found[0]) if found else (str(theirs), theirs.named(group))
        )
        paired = paired_stats(mine.named(group), other)
        if paired is not None:
            rows.append(
                {"dataset": dataset, "encoder": encoder, "regime": regime, "method": str(mine)}
                | {"reference": reference, **paired}
            )
    return pd.DataFrame(rows)


def pair_count(pairs: pd.DataFrame) -> str:
    """``6 (2×3)`` when the pairs are every encoder seed with every label seed, else the count."""
    encoder_seeds, label_seeds = pairs["encoder_seed"].nunique(), pairs["seed"].nunique()
    grid = (
        f" ({encoder_seeds}×{label_seeds})" if encoder_seeds > 1 and encoder_seeds * label_seeds == len(pairs) else ""
    )
    return f"{len(pairs)}{grid}"


def wins_ties_losses(differences: np.ndarray) -> str:
    """``W/T/L`` of paired differences; a tie is an equal accuracy, up to float rounding."""
    tie = np.isclose(differences, 0, atol=1e-9)
    return f"{(~tie & (differences > 0)).sum()}/{tie.sum()}/{(~tie & (differences < 0)).sum()}"


def interval_text(low: float, high: float, digits: int = 2) -> str:
    return "–" if np.isnan(low) else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def per_image_differences(pairs: pd.DataFrame) -> np.ndarray | None:
    """Per pair, the per-image differences in points (method's correctness − reference's, × 100) on the same test
    images; None unless every result of every pair kept its correctness on equally many images."""
    if CORRECT not in pairs or f"{CORRECT}_theirs" not in pairs:
        return None
    mine, theirs = pairs[CORRECT].tolist(), pairs[f"{CORRECT}_theirs"].tolist()
    if any(not isinstance(kept, (list, tuple, np.ndarray)) for kept in mine + theirs):
        return None
    if len({len(kept) for kept in mine + theirs}) != 1:
        return None
    return (np.asarray(mine, dtype=float) - np.asarray(theirs, dtype=float)) * 100


def refuse_repeated_pairs(results: pd.DataFrame) -> None:
    """A one-line UserError when one method has two results for the same encoder seed and label seed (e.g. a rerun
    kept beside the first run): a pair would be counted twice. Names the two results' folders."""
    repeated = results[results.duplicated(PAIR_KEYS, keep=False)]
    if repeated.empty:
        return
    first = repeated.iloc[0]
    same = repeated[(repeated[PAIR_KEYS] == first[PAIR_KEYS]).all(axis=1)]
    where = " and ".join(f"'{folder}'" for folder in same.get("result_dir", pd.Series(["?"] * len(same))).head(2))
    raise UserError(
        f"report: {first['method']} has {len(same)} results for encoder seed {first['encoder_seed']} and label seed "
        f"{first['seed']} ({where}); keep one of them, or report their folders apart"
    )


def paired_stats(mine: pd.DataFrame, theirs: pd.DataFrame) -> dict | None:
    """``mine`` minus ``theirs`` over the results they share encoder seed and label seed with (``accuracy`` columns,
    in points): the pair count, mean difference, its design-aware 95% interval (``statistics.compare``), the
    p-value of no difference, P(method > reference) with its interval, W/T/L and what was resampled; None when
    nothing pairs."""
    kept = [CORRECT] if CORRECT in theirs else []
    for side in (mine, theirs):
        refuse_repeated_pairs(side)
    pairs = mine.merge(theirs[[*PAIR_KEYS, "accuracy", *kept]], on=PAIR_KEYS, suffixes=("", "_theirs"))
    if pairs.empty:
        return None
    differences = (pairs["accuracy"] - pairs["accuracy_theirs"]).to_numpy()
    result = compare(
        pairs["encoder_seed"].to_numpy(), pairs["seed"].to_numpy(), differences, per_image_differences(pairs)
    )
    improvement = f"{result.improvement:.2f}" + (
        "" if np.isnan(result.improvement_low) else f" {interval_text(result.improvement_low, result.improvement_high)}"
    )
    return {
        "pairs": pair_count(pairs),
        "difference": result.difference,
        "low": result.low,
        "high": result.high,
        "95% interval": interval_text(result.low, result.high),
        "p": result.p_value,
        "P(improvement)": improvement.replace("+", ""),
        "W/T/L": wins_ties_losses(differences),
        "resampled": result.design.describe(str(pairs["encoder_seed"].iloc[0])),
        "standard_error": result.standard_error,
        "df": result.df,
        "p_improvement": result.improvement,
        "p_improvement_low": result.improvement_low,
        "p_improvement_high": result.improvement_high,
    }


def paired_differences(
    results: pd.DataFrame, references: list[str] | None = None, primaries: list[Primary] | None = None
) -> pd.DataFrame:
    """One row per (dataset, encoder, regime, method, reference) with at least one pair: the number of pairs, the
    mean difference in accuracy points (method − reference, rounded to 0.01; the bounds are not), its design-aware
    95% interval, p-value, P(improvement), wins/ties/losses and what the interval resampled; ``role`` primary
    (Holm-adjusted as a family, ``mark_primaries``) or exploratory.
    ``references``: method titles or ``best-single``, each refused unless present; None: the defaults, those
    that ran. The references of ``primaries`` are added."""
    primaries = primaries or []
    if references is None:
        references = list(DEFAULT_REFERENCES)
    else:
        check_references(results, references)
    check_references(results, [p.reference for p in primaries])
    references = [*references, *(p.reference for p in primaries if p.reference not in references)]
    results = results.assign(
        accuracy=results["test_accuracy"] * 100, pretexts_list=results["pretext_set"].str.split("+")
    )
    rows = []
    for (dataset, encoder, regime), group in results.groupby(GROUP_KEYS, sort=False):
        for method, mine in group.groupby("method", sort=False):
            for reference in references:
                found = reference_rows(group, reference, mine.iloc[0])
                if found is None or method in set(found[0]["method"]):
                    continue
                paired = paired_stats(mine, found[0])
                if paired is not None:
                    rows.append(
                        {
                            "dataset": dataset,
                            "encoder": encoder,
                            "regime": regime,
                            "method": method,
                            "reference": found[1],
                            **paired,
                            "method_title": mine["title"].iloc[0],
                            "reference_title": reference,
                        }
                    )
    table = mark_primaries(pd.DataFrame(rows), primaries)
    return table.assign(difference=table["difference"].round(2)) if not table.empty else table


def mark_primaries(table: pd.DataFrame, primaries: list[Primary]) -> pd.DataFrame:
    """``role`` per row; the primary rows' Holm-adjusted p-values and intervals (``p (Holm)``, ``holm_low``,
    ``holm_high`` at ``holm_confidence``), adjusted as one family. A primary that names no row is refused."""
    if table.empty:
        return table
    chosen = np.zeros(len(table), dtype=bool)
    for primary in primaries:
        match = (
            ((table["method_title"] == primary.method) | (table["method"] == primary.method))
            & (table["reference_title"] == primary.reference)
        ).to_numpy()
        if not match.any():
            compared = sorted(set(table["method_title"] + ":" + table["reference_title"]))
            raise UserError(f"report: primary '{primary}' names no paired comparison; compared: {', '.join(compared)}")
        chosen |= match
    table = table.assign(role=np.where(chosen, PRIMARY, EXPLORATORY))
    if not chosen.any():
        return table
    family = table[chosen]
    adjusted = holm(family["p"])
    levels = holm_confidence(family["p"], adjusted, CONFIDENCE)
    bounds = [
        t_bounds(d, se, df, level) if not np.isnan(level) else (np.nan, np.nan)
        for d, se, df, level in zip(family["difference"], family["standard_error"], family["df"], levels)
    ]
    table.loc[chosen, "p (Holm)"] = adjusted
    table.loc[chosen, "holm_confidence"] = levels
    table.loc[chosen, ["holm_low", "holm_high"]] = np.array(bounds, dtype=float).reshape(-1, 2)
    table.loc[chosen, "Holm 95% interval"] = [interval_text(low, high) for low, high in bounds]
    return table


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The paired table as the Markdown shows it: without the columns kept for the CSV only, p-values to three
    digits; without ``resampled`` when every row resampled alike (the text above the table says it)."""
    view = table.drop(columns=[c for c in NUMBERS_ONLY if c in table]).copy()
    for column in ("p", "p (Holm)"):
        if column in view:
            view[column] = view[column].map(lambda p: "–" if pd.isna(p) else "<0.001" if p < 0.001 else f"{p:.3f}")
    if "resampled" in view and view["resampled"].nunique() == 1:
        view = view.drop(columns="resampled")
    return view.fillna("–")


def paired_control_costs(results: pd.DataFrame, controls: tuple[str, ...]) -> pd.DataFrame:
    """Negative transfer, paired: each result over pretexts that include a control (``noise``, ``random``) minus the
    same method (options included) over the same pretexts without it, on the same labeled subset and encoders.
    Exploratory rows, the difference rounded to 0.01."""
    results = results.assign(accuracy=results["test_accuracy"] * 100)
    keys = ["dataset", "encoder", "regime", *VARIANT]
    rows = []
    for (dataset, encoder, regime, *_), group in results.groupby(keys, sort=False):
        for pretext_set, mine in group.groupby("pretext_set", sort=False):
            names = pretext_set.split("+")
            for control in (c for c in controls if c in names and len(names) > 1):
                base_set = "+".join(n for n in names if n != control)
                paired = paired_stats(mine, group[group["pretext_set"] == base_set])
                if paired is not None:
                    rows.append(
                        {
                            "dataset": dataset,
                            "encoder": encoder,
                            "regime": regime,
                            "method": mine["title"].iloc[0],
                            "pretexts": base_set,
                            "added": control,
                            **paired,
                        }
                    )
    costs = pd.DataFrame(rows)
    return costs.assign(difference=costs["difference"].round(2)) if not costs.empty else costs
