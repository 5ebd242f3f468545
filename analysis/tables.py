"""The paper's tables (docs/algorithms.md, "Expected numbers") from collected runs, as DataFrames, markdown
and LaTeX.

- best_gen_table: per method and expert count, the calibration mix with the best GEN and its MC/GEN
  ("Best-GEN mix per method at 96 experts: ... REAM 69.8 (0:.5:.5)"). Ties go to the higher MC.
- mix_table: one row per mix, one column per method x expert count, cells "MC/GEN" with one decimal,
  each with its standard error where the runs recorded one ("61.0 ± 0.8/58.2 ± 1.1").
- hypervolume_table: per method and expert count, hypervolume, frontier size and the reference point;
  reference_note says in words which point was used (the report writes it under the table).

Inputs are collect_runs tables (or any table with method, experts, mix, mc, gen); failed runs and the
uncompressed model (method 'none') are left out, seeds averaged (see analysis.pareto.compared_points):
runs of one (method, experts, mix) with the same settings, the seed aside (analysis.settings).
Rows with different eval settings are refused unless allow_mixed_evals=True; then the tables get an
eval_setting column, and mix_table one row per (mix, eval setting). Rows that differ in other settings
(model, method settings on one frontier, calibration settings besides the mix) are refused unless
allow_mixed_settings=True; then the tables get a `setting` column (each point's values of the settings
that differ), and mix_table one row per (mix, setting).
to_markdown / to_latex print a value with its `<name>_stderr` column as "61.0 ± 0.8".
Library module; `python -m analysis.report` writes the tables.
"""

import math

import pandas as pd

from analysis.naming import method_label
from analysis.pareto import compared_points, frontiers

MISSING = "-"
STDERR_SUFFIX = "_stderr"


def best_gen_table(df: pd.DataFrame, allow_mixed_evals: bool = False,
                   allow_mixed_settings: bool = False) -> pd.DataFrame:
    """Columns method (label), experts, mix, mc, gen, mc_stderr, gen_stderr (+ eval_setting, setting when
    mixed); experts descending, methods in data order."""
    points = compared_points(df, allow_mixed_evals, allow_mixed_settings)
    ranked = points.sort_values(["gen", "mc"], ascending=False, kind="stable")
    best = ranked.groupby(["method", "experts"], sort=False).head(1)
    best = _in_display_order(best, points)
    columns = ["method", "experts", "mix", "mc", "gen", "mc_stderr", "gen_stderr"] + _eval_column(points)
    return best.assign(method=best["method"].map(method_label))[columns]


def mix_table(df: pd.DataFrame, allow_mixed_evals: bool = False, allow_mixed_settings: bool = False) -> pd.DataFrame:
    """Rows = mixes (data order; per eval setting and setting when mixed), columns = 'Label experts' (experts
    descending), cells 'MC/GEN' (each 'x ± se' where the stderr is known)."""
    points = compared_points(df, allow_mixed_evals, allow_mixed_settings)
    keys = ["mix"] + _eval_column(points)
    columns = _in_display_order(points.drop_duplicates(["method", "experts"]), points)
    table = points[keys].drop_duplicates().reset_index(drop=True)
    row_keys = list(table.itertuples(index=False, name=None))
    for method, experts in zip(columns["method"], columns["experts"]):
        cells = points[(points["method"] == method) & (points["experts"] == experts)]
        cell = dict(zip(cells[keys].itertuples(index=False, name=None),
                        (_cell(*values) for values in zip(cells["mc"], cells["gen"], cells["mc_stderr"],
                                                          cells["gen_stderr"]))))
        table[f"{method_label(method)} {experts}"] = [cell.get(key, MISSING) for key in row_keys]
    return table


def hypervolume_table(df: pd.DataFrame, offset: float = 1.0, allow_mixed_evals: bool = False,
                      ref=None, allow_mixed_settings: bool = False) -> pd.DataFrame:
    """Columns method (label), experts, hypervolume, frontier_size, n_points, ref_mc, ref_gen (+ settings,
    the frontier's points' settings, when mixed); the reference point as analysis.pareto.frontiers chooses
    it (see reference_note)."""
    fronts = frontiers(df, offset, allow_mixed_evals, ref, allow_mixed_settings)
    table = _in_display_order(fronts, fronts)
    columns = ["method", "experts", "hypervolume", "frontier_size", "n_points", "ref_mc", "ref_gen"]
    if bool(fronts["mixed_settings"].any()):
        columns.append("settings")
    table = table.assign(method=table["method"].map(method_label),
                         settings=table["settings"].map(lambda labels: " / ".join(labels) or MISSING))[columns]
    table.attrs["reference"] = reference_note(fronts)
    return table.reset_index(drop=True)


def reference_note(fronts: pd.DataFrame) -> str:
    """'Hypervolume reference point: <rule>: 24 experts (49, 39); 16 experts (...)' for a frontiers table."""
    if fronts.empty:
        return "Hypervolume reference point: none (no frontier)."
    points = fronts.drop_duplicates("experts").sort_values("experts", ascending=False)
    where = "; ".join(f"{e} experts ({x:.1f}, {y:.1f})" for e, x, y in
                      zip(points["experts"], points["ref_mc"], points["ref_gen"]))
    return f"Hypervolume reference point (MC, GEN): {fronts['ref_rule'].iloc[0]}: {where}."


def _eval_column(points: pd.DataFrame) -> list[str]:
    """The columns that keep a mixed comparison's points apart: eval_setting, setting (only when mixed)."""
    return ((["eval_setting"] if bool(points["mixed_evals"].any()) else [])
            + (["setting"] if bool(points["mixed_settings"].any()) else []))


def with_stderr(value, stderr) -> str:
    """61.04, 0.81 -> '61.0 ± 0.8'; without a finite stderr just '61.0'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    known = stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr))
    return f"{value:.1f} ± {stderr:.1f}" if known else f"{value:.1f}"


def _cell(mc: float, gen: float, mc_stderr=None, gen_stderr=None) -> str:
    return f"{with_stderr(mc, mc_stderr)}/{with_stderr(gen, gen_stderr)}"


def _in_display_order(rows: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    """Sort by experts descending, then methods in order of first appearance in the data."""
    rank = {m: i for i, m in enumerate(dict.fromkeys(points["method"]))}
    keys = pd.DataFrame({"e": -rows["experts"], "m": rows["method"].map(rank)}, index=rows.index)
    return rows.loc[keys.sort_values(["e", "m"], kind="stable").index]


def merge_stderrs(table: pd.DataFrame) -> pd.DataFrame:
    """Each column `x` with a column `x_stderr` becomes text 'x ± se' and the stderr column is dropped;
    a stderr column with no value at all is just dropped (the numbers stay numbers)."""
    table = table.copy()
    for column in [c for c in table.columns if f"{c}{STDERR_SUFFIX}" in table.columns]:
        errors = table.pop(f"{column}{STDERR_SUFFIX}")
        if errors.notna().any():
            table[column] = [with_stderr(v, e) for v, e in zip(table[column], errors)]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    text = merge_stderrs(table).to_markdown(index=False, floatfmt=".1f")
    return text + (f"\n\n{table.attrs['reference']}" if "reference" in table.attrs else "")


def to_latex(table: pd.DataFrame) -> str:
    """A tabular; a table carrying a reference note becomes a table with the note as its caption."""
    caption = table.attrs.get("reference")
    return merge_stderrs(table).to_latex(index=False, float_format="%.1f", escape=True, caption=caption)
