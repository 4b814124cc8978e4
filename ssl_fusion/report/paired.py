"""Paired differences: each method against reference methods on the same labeled subsets and the same encoders.

Two results form a pair when they share dataset, encoder, encoder seed, label regime, label seed and pretext set:
the same labeled images fed to the same frozen encoders, so the seed-to-seed spread that both share cancels in
their difference. Results without such a partner are left out, never paired with another seed's.

The reference ``best-single`` is, for each encoder seed and regime, the ``single`` head whose pretext had the best
mean cross-validation accuracy over the label seeds: chosen on the labeled training images, never on test.
Other references are named by a method's ``title`` (``concat``, ``select[by=val]``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ssl_fusion.report.results import VARIANT
from ssl_fusion.runtime.errors import UserError

BEST_SINGLE = "best-single"
DEFAULT_REFERENCES = ("concat", "select[by=val]", BEST_SINGLE)
PAIR_KEYS = ["encoder_seed", "seed"]
GROUP_KEYS = ["dataset", "encoder", "regime"]


def t_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t confidence interval (NaN bounds for one pair)."""
    mean = float(np.mean(differences))
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * scipy_stats.sem(differences)
    return mean, mean - half, mean + half


def check_references(results: pd.DataFrame, references: list[str]) -> None:
    """Each reference must be a method's title present in the results, or ``best-single``."""
    present = sorted(set(results["title"]))
    for reference in references:
        if reference != BEST_SINGLE and reference not in present:
            raise UserError(f"report: reference '{reference}' is not among the results' methods; "
                            f"valid: {', '.join([*present, BEST_SINGLE])}")


def best_single(group: pd.DataFrame, pretexts: list[str]) -> tuple[pd.DataFrame, str] | None:
    """Per encoder seed, the ``single`` results of the pretext (among ``pretexts``) with the best mean
    cross-validation accuracy over label seeds; None when no single head ran or none has a validation score."""
    singles = group[(group["family"] == "single") & group["pretext_set"].isin(pretexts)]
    if "cv_accuracy" not in singles or singles["cv_accuracy"].isna().all():
        return None
    chosen, names = [], set()
    for _, part in singles.groupby("encoder_seed"):
        scores = part.groupby("pretext_set")["cv_accuracy"].mean().dropna()
        if scores.empty:
            continue
        names.add(scores.idxmax())
        chosen.append(part[part["pretext_set"] == scores.idxmax()])
    return (pd.concat(chosen), "+".join(sorted(names))) if chosen else None


def reference_rows(group: pd.DataFrame, reference: str, mine: pd.Series) -> tuple[pd.DataFrame, str] | None:
    """The results ``mine`` (one method's) pairs with under ``reference``, and how the reference is named."""
    if reference == BEST_SINGLE:
        found = best_single(group, mine["pretexts_list"])
        return None if found is None else (found[0], f"best single on validation ({found[1]})")
    rows = group[(group["title"] == reference) & (group["pretext_set"] == mine["pretext_set"])]
    return (rows, reference) if not rows.empty else None


def pair_count(pairs: pd.DataFrame) -> str:
    """``6 (2×3)`` when the pairs are every encoder seed with every label seed, else the count."""
    encoder_seeds, label_seeds = pairs["encoder_seed"].nunique(), pairs["seed"].nunique()
    grid = f" ({encoder_seeds}×{label_seeds})" if encoder_seeds > 1 and encoder_seeds * label_seeds == len(pairs) else ""
    return f"{len(pairs)}{grid}"


def wins_ties_losses(differences: np.ndarray) -> str:
    """``W/T/L`` of paired differences; a tie is an equal accuracy, up to float rounding."""
    tie = np.isclose(differences, 0, atol=1e-9)
    return f"{(~tie & (differences > 0)).sum()}/{tie.sum()}/{(~tie & (differences < 0)).sum()}"


def interval_text(low: float, high: float) -> str:
    return "–" if np.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def paired_stats(mine: pd.DataFrame, theirs: pd.DataFrame) -> dict | None:
    """``mine`` minus ``theirs`` over the results they share encoder seed and label seed with (``accuracy`` columns,
    in points): the pair count, mean difference, its 95% t-interval and W/T/L; None when nothing pairs."""
    pairs = mine.merge(theirs[[*PAIR_KEYS, "accuracy"]], on=PAIR_KEYS, suffixes=("", "_theirs"))
    if pairs.empty:
        return None
    differences = (pairs["accuracy"] - pairs["accuracy_theirs"]).to_numpy()
    mean, low, high = t_interval(differences)
    return {"pairs": pair_count(pairs), "difference": round(mean, 2), "low": low, "high": high,
            "95% interval": interval_text(low, high), "W/T/L": wins_ties_losses(differences)}


def paired_differences(results: pd.DataFrame, references: list[str] | None = None) -> pd.DataFrame:
    """One row per (dataset, encoder, regime, method, reference) with at least one pair: the number of pairs, the
    mean difference in accuracy points (method − reference), its 95% t-interval and wins/ties/losses.
    ``references``: method titles or ``best-single``, each refused unless present; None: the defaults, those
    that ran."""
    if references is None:
        references = list(DEFAULT_REFERENCES)
    else:
        check_references(results, references)
    results = results.assign(accuracy=results["test_accuracy"] * 100, pretexts_list=results["pretext_set"].str.split("+"))
    rows = []
    for (dataset, encoder, regime), group in results.groupby(GROUP_KEYS, sort=False):
        for method, mine in group.groupby("method", sort=False):
            for reference in references:
                found = reference_rows(group, reference, mine.iloc[0])
                if found is None or method in set(found[0]["method"]):
                    continue
                paired = paired_stats(mine, found[0])
                if paired is not None:
                    rows.append({"dataset": dataset, "encoder": encoder, "regime": regime, "method": method,
                                 "reference": found[1], **paired})
    return pd.DataFrame(rows)


def paired_control_costs(results: pd.DataFrame, controls: tuple[str, ...]) -> pd.DataFrame:
    """Negative transfer, paired: each result over pretexts that include a control (``noise``, ``random``) minus the
    same method (options included) over the same pretexts without it, on the same labeled subset and encoders."""
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
                    rows.append({"dataset": dataset, "encoder": encoder, "regime": regime,
                                 "method": mine["title"].iloc[0], "pretexts": base_set, "added": control, **paired})
    return pd.DataFrame(rows).drop(columns=["low", "high"], errors="ignore")
