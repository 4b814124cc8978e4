"""The report's negative-transfer table pairs each method variant with and without a control pretext."""

from __future__ import annotations

import pandas as pd

from ssl_fusion.report.tables import negative_transfer, print_table, summarize


def record(method: str, pretexts: list[str], accuracy: float, seed: int, screened_out: list[str] | None = None) -> dict:
    return {"method": f"{method}({'+'.join(pretexts)})", "fusion": method.split("[")[0], "pretexts": pretexts,
            "pretext_set": "+".join(sorted(pretexts)), "regime": "1%", "seed": seed, "test_accuracy": accuracy,
            "screened_out": screened_out}


def test_each_variant_of_a_head_is_compared_with_itself():
    rows = []
    for seed in (0, 1):
        rows += [
            record("select[by=val]", ["a", "b"], 0.80, seed),
            record("select[by=val]", ["a", "b", "random"], 0.78, seed),
            record("select[by=knn]", ["a", "b"], 0.70, seed),
            record("select[by=knn]", ["a", "b", "random"], 0.75, seed),
            record("concat", ["a", "b", "noise"], 0.81, seed, screened_out=["noise"] if seed == 0 else []),
            record("concat", ["a", "b"], 0.80, seed),
        ]
    table = negative_transfer(summarize(pd.DataFrame(rows))).set_index(["fusion", "added"])
    assert len(table) == 3
    assert table.loc[("select[by=val]", "random"), "difference"] == -2.0
    assert table.loc[("select[by=knn]", "random"), "difference"] == 5.0
    assert table.loc[("concat", "noise"), ["without", "with"]].tolist() == [80.0, 81.0]
    assert table.loc[("concat", "noise"), "screened out"] == "1 of 2 seeds"
    assert table.loc[("select[by=val]", "random"), "screened out"] == "0 of 2 seeds"


def test_results_from_before_the_screen_count_no_screened_seeds():
    rows = [record("mean", ["a", "noise"], 0.7, 0), record("mean", ["a"], 0.8, 0)]
    for row in rows:
        del row["screened_out"]
    table = negative_transfer(summarize(pd.DataFrame(rows)))
    assert table["screened out"].tolist() == ["0 of 1 seeds"]


def test_printed_table_keeps_bracketed_method_names(capsys):
    table = pd.DataFrame({"1%": ["80.00 ± 0.00 (n=1)"]}, index=["select[by=val](a+b)"])
    print_table(table, "title")
    assert "select[by=val](a+b)" in capsys.readouterr().out
