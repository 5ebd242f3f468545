"""The paper's tables (SPEC section 9) from collected runs, as DataFrames, markdown and LaTeX.

- best_gen_table: per method and expert count, the calibration mix with the best GEN and its MC/GEN
  ("Best-GEN mix per method at 96 experts: ... REAM 69.8 (0:.5:.5)"). Ties go to the higher MC.
- mix_table: one row per mix, one column per method x expert count, cells "MC/GEN" with one decimal.

Inputs are collect_runs tables (or any table with method, experts, mix, mc, gen); failed runs and the
uncompressed model (method 'none') are left out, seeds averaged (see analysis.pareto.compared_points).
Rows scored on different task sets are refused unless allow_mixed_task_sets=True; then both tables
get a task_set column, and mix_table one row per (mix, task set).
Library module; `python -m analysis.report` writes both tables.
"""

import pandas as pd

from analysis.naming import method_label
from analysis.pareto import compared_points

MISSING = "-"


def best_gen_table(df: pd.DataFrame, allow_mixed_task_sets: bool = False) -> pd.DataFrame:
    """Columns method (label), experts, mix, mc, gen (+ task_set when mixed); experts descending,
    methods in data order."""
    points = compared_points(df, allow_mixed_task_sets)
    ranked = points.sort_values(["gen", "mc"], ascending=False, kind="stable")
    best = ranked.groupby(["method", "experts"], sort=False).head(1)
    best = _in_display_order(best, points)
    columns = ["method", "experts", "mix", "mc", "gen"] + _task_set_column(points)
    return best.assign(method=best["method"].map(method_label))[columns]


def mix_table(df: pd.DataFrame, allow_mixed_task_sets: bool = False) -> pd.DataFrame:
    """Rows = mixes (data order; per task set when mixed), columns = 'Label experts' (experts
    descending), cells 'MC/GEN'."""
    points = compared_points(df, allow_mixed_task_sets)
    keys = ["mix"] + _task_set_column(points)
    columns = _in_display_order(points.drop_duplicates(["method", "experts"]), points)
    table = points[keys].drop_duplicates().reset_index(drop=True)
    row_keys = list(table.itertuples(index=False, name=None))
    for method, experts in zip(columns["method"], columns["experts"]):
        cells = points[(points["method"] == method) & (points["experts"] == experts)]
        cell = dict(zip(cells[keys].itertuples(index=False, name=None),
                        (_cell(x, y) for x, y in zip(cells["mc"], cells["gen"]))))
        table[f"{method_label(method)} {experts}"] = [cell.get(key, MISSING) for key in row_keys]
    return table


def _task_set_column(points: pd.DataFrame) -> list[str]:
    return ["task_set"] if bool(points["mixed_task_sets"].any()) else []


def _cell(mc: float, gen: float) -> str:
    return f"{mc:.1f}/{gen:.1f}"


def _in_display_order(rows: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Sort by experts descending, then methods in order of first appearance in the data."""
    rank = {m: i for i, m in enumerate(dict.fromkeys(points["method"]))}
    keys = pd.DataFrame({"e": -rows["experts"], "m": rows["method"].map(rank)}, index=rows.index)
    return rows.loc[keys.sort_values(["e", "m"], kind="stable").index]


def to_markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".1f")


def to_latex(table: pd.DataFrame) -> str:
    return table.to_latex(index=False, float_format="%.1f", escape=True)
