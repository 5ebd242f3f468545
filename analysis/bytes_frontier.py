"""Frontiers in bytes: MC, GEN and AVG against the checkpoint's weight bytes for every (method, ratio, quant)
point, the frontier over all of them and each method's own, the best point within memory budgets, and the
hypervolume over (bytes saved, score) (docs/bytes.md).

    points, skipped = bytes_points(runs)        # one row per point; `skipped`: scored runs without bytes
    frontier = bytes_frontiers(points)          # JSON-ready: per score, the frontier over all and per method
    bytes_budget_table(points, (0.75, 0.5, 0.25)), bytes_hypervolume_table(points), plot_bytes_frontiers(...)

A point is one (method, experts, quant, mix) under one eval setting and setting (analysis.pareto: refused
unless allowed when those differ), its seeds averaged; runs of two quantisations are two points, never one.
The uncompressed model is a point too: its own runs (method none, no quant) and the baseline every run
carries, at the uncompressed model's bytes. Its x is weight_bytes, the bytes metrics.json measured on the
checkpoint's files (computed from the model for save=false), and bytes_fraction = weight_bytes / bytes_before
(the uncompressed model's bytes); bytes_saved = 1 - bytes_fraction. Runs without them (metrics.json from
before they were recorded) are left out and counted (`skipped`).

A point dominates another when it has no more bytes and no lower score, and fewer bytes or a higher score:
the frontier is analysis.pareto.pareto_front over (bytes_saved, score), and the hypervolume
analysis.pareto.hypervolume over the same plane, the reference point at (0 saved, smallest score of every
point - offset) unless `ref` (MC, GEN) fixes the scores' (AVG's then their mean). Each method's frontier
spans its expert counts, quantisations and mixes; 'all' is the frontier over every point. Library module;
`python -m analysis.report` writes its files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.naming import NO_QUANT, method_label, with_quant
from analysis.pareto import (BASELINE, check_evals, check_settings, eval_labels, hypervolume, is_uncompressed,
                             pareto_front, quants)
from analysis.plots import _save

SCORES = {"mc": "MC", "gen": "GEN", "avg": "AVG"}
BUDGETS = (0.75, 0.5, 0.25)  # fractions of the uncompressed model's bytes (--budgets)
ALL = "all"  # the frontier over every point
KEYS = ["method", "experts", "quant", "mix", "eval_setting", "setting"]
VALUES = ["mc", "gen", "avg", "mc_stderr", "gen_stderr", "avg_stderr", "weight_bytes", "bytes_before"]
MISSING = "-"
MARKERS = {NO_QUANT: "o"}
OTHER_MARKERS = ["s", "D", "^", "v", "P", "X", "<", ">"]


# ---------------------------------------------------------------- points

def _numbers(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(np.nan, index=df.index)


def bytes_points(df: pd.DataFrame, allow_mixed_evals: bool = False,
                 allow_mixed_settings: bool = False) -> tuple[pd.DataFrame, int]:
    """(points, skipped): one row per point (see the module doc) with bytes_fraction and bytes_saved, and
    how many scored runs were left out for want of bytes. Raises EvalMismatch / SettingsMismatch as
    analysis.pareto.compared_points does."""
    scored = df[df["mc"].notna() & df["gen"].notna()]
    mixed = check_evals(scored, allow_mixed_evals)
    mixed_settings, settings = check_settings(scored, allow_mixed_settings)
    data = pd.DataFrame({
        "method": scored["method"].astype(str), "quant": quants(scored),
        "experts": _numbers(scored, "experts"), "mix": scored["mix"].astype(str) if "mix" in scored else MISSING,
        "eval_setting": eval_labels(scored), "setting": settings.to_numpy(),
        **{c: _numbers(scored, c) for c in VALUES}, "experts_before": _numbers(scored, "experts_before"),
        **{f"baseline_{c}": _numbers(scored, f"baseline_{c}") for c in ("mc", "gen", "mc_stderr", "gen_stderr")},
    }, index=scored.index)
    data["avg"] = data["avg"].fillna((data["mc"] + data["gen"]) / 2)
    has = data["weight_bytes"].notna() & (data["bytes_before"] > 0)
    skipped = int((~has).sum())
    data = data[has]
    own = data[is_uncompressed(data)]
    rows = pd.concat([data, _carried_baselines(data, own)], ignore_index=True)
    rows.loc[is_uncompressed(rows), "mix"] = MISSING  # the uncompressed model reads no calibration
    points = rows.groupby(KEYS, sort=False, dropna=False, as_index=False)[VALUES].mean()
    points["bytes_fraction"] = points["weight_bytes"] / points["bytes_before"]
    points["bytes_saved"] = 1 - points["bytes_fraction"]
    points["label"] = [method_label(with_quant(m, q)) for m, q in zip(points["method"], points["quant"])]
    return points.assign(mixed_evals=mixed, mixed_settings=mixed_settings), skipped


def _carried_baselines(data: pd.DataFrame, own: pd.DataFrame) -> pd.DataFrame:
    """The uncompressed model's point from the baseline each run carries, at bytes_before; one per eval
    setting and score, none where a run of the uncompressed model itself gives it."""
    carried = data[data["baseline_mc"].notna() & data["baseline_gen"].notna()]
    rows = pd.DataFrame({
        "method": BASELINE, "quant": NO_QUANT, "experts": carried["experts_before"], "mix": MISSING,
        "eval_setting": carried["eval_setting"], "setting": carried["setting"],
        "mc": carried["baseline_mc"], "gen": carried["baseline_gen"],
        "avg": (carried["baseline_mc"] + carried["baseline_gen"]) / 2,
        "mc_stderr": carried["baseline_mc_stderr"], "gen_stderr": carried["baseline_gen_stderr"],
        "avg_stderr": np.nan, "weight_bytes": carried["bytes_before"], "bytes_before": carried["bytes_before"],
    })
    key = lambda frame: list(zip(frame["eval_setting"], frame["mc"].round(6), frame["gen"].round(6)))
    rows = rows.assign(_key=key(rows)).drop_duplicates("_key")
    rows = rows[~rows["_key"].isin(set(key(own)))]
    return rows.drop(columns="_key")


# ---------------------------------------------------------------- frontiers and hypervolumes

def reference(points: pd.DataFrame, score: str, offset: float = 1.0, ref=None) -> tuple[float, float]:
    """(bytes saved, score) below which a point adds nothing to the hypervolume (see the module doc)."""
    if ref is not None:
        mc, gen = (float(v) for v in np.asarray(ref, dtype=float).reshape(2))
        return 0.0, {"mc": mc, "gen": gen, "avg": (mc + gen) / 2}[score]
    values = points[score].dropna()
    return 0.0, float(values.min() - offset) if len(values) else 0.0


def reference_rule(offset: float = 1.0, ref=None) -> str:
    if ref is not None:
        mc, gen = (float(v) for v in np.asarray(ref, dtype=float).reshape(2))
        return f"(0 bytes saved, score fixed at MC {mc:g} / GEN {gen:g} / AVG {(mc + gen) / 2:g})"
    return f"(0 bytes saved, {offset:g} below the smallest score of every point)"


def _scored(points: pd.DataFrame, score: str) -> pd.DataFrame:
    return points[points[score].notna() & points["bytes_saved"].notna()]


def frontier_of(points: pd.DataFrame, score: str) -> pd.DataFrame:
    """The points no other beats in bytes and `score` (fewest bytes first)."""
    rows = _scored(points, score)
    front = rows.iloc[pareto_front(rows[["bytes_saved", score]].to_numpy())] if len(rows) else rows
    return front.iloc[::-1]  # pareto_front sorts by bytes saved ascending: most bytes first


def groups(points: pd.DataFrame):
    """('all', every point), then (method, its points) in data order."""
    yield ALL, points
    yield from points.groupby("method", sort=False)


def bytes_frontiers(points: pd.DataFrame, skipped: int = 0, offset: float = 1.0, ref=None,
                    budgets=BUDGETS) -> dict:
    """Per score: reference point, and for 'all' and each method its hypervolume, point count and frontier."""
    out = {"skipped_without_bytes": skipped, "budgets": [float(b) for b in budgets],
           "reference_rule": reference_rule(offset, ref), "mixed_evals": bool(points["mixed_evals"].any()),
           "mixed_settings": bool(points["mixed_settings"].any()), "scores": {}}
    for score in SCORES:
        ref_point = reference(points, score, offset, ref)
        entry = {"reference": list(ref_point), "frontiers": {}}
        for name, group in groups(points):
            rows = _scored(group, score)
            entry["frontiers"][str(name)] = {
                "hypervolume": hypervolume(rows[["bytes_saved", score]].to_numpy(), ref_point) if len(rows) else 0.0,
                "n_points": len(rows), "frontier": [_record(r, score) for _, r in frontier_of(rows, score).iterrows()]}
        out["scores"][score] = entry
    return out


def _record(row, score: str) -> dict:
    record = {"method": row["method"], "quant": row["quant"], "mix": row["mix"],
              "weight_bytes": int(row["weight_bytes"]), "bytes_fraction": float(row["bytes_fraction"]),
              score: float(row[score])}
    if pd.notna(row["experts"]):
        record["experts"] = int(row["experts"])
    if pd.notna(row[f"{score}_stderr"]):
        record[f"{score}_stderr"] = float(row[f"{score}_stderr"])
    if row["setting"]:
        record["setting"] = row["setting"]
    return record


# ---------------------------------------------------------------- tables

def bytes_budget_table(points: pd.DataFrame, budgets=BUDGETS) -> pd.DataFrame:
    """Per budget (a fraction of the uncompressed model's bytes) and score: the point with the best score
    within it (ties: fewer bytes), or '-' when none fits. experts and 'bytes %' (of the uncompressed model's)
    as text, value and value_stderr as numbers (analysis.tables.to_markdown prints 'value ± se')."""
    mixed = bool(points["mixed_settings"].any())
    rows = []
    for budget in budgets:
        fits = points[points["bytes_fraction"] <= budget + 1e-12]
        for score, name in SCORES.items():
            ranked = _scored(fits, score).sort_values([score, "bytes_fraction"], ascending=[False, True], kind="stable")
            row = {"budget": f"{100 * budget:g}%", "score": name}
            if ranked.empty:
                rows.append({**row, "method": MISSING, "experts": MISSING, "mix": MISSING, "bytes %": MISSING,
                             **({"setting": MISSING} if mixed else {})})
                continue
            best = ranked.iloc[0]
            experts = MISSING if pd.isna(best["experts"]) else str(int(best["experts"]))
            rows.append({**row, "method": best["label"], "experts": experts, "mix": best["mix"],
                         "bytes %": f"{100 * best['bytes_fraction']:.1f}", "value": best[score],
                         "value_stderr": best[f"{score}_stderr"], **({"setting": best["setting"]} if mixed else {})})
    columns = ["budget", "score", "method", "experts", "mix", "bytes %", "value", "value_stderr"]
    return pd.DataFrame(rows, columns=columns + (["setting"] if mixed else []))


def bytes_hypervolume_table(points: pd.DataFrame, offset: float = 1.0, ref=None) -> pd.DataFrame:
    """'all' then each method: its hypervolume over (bytes saved, score) for MC, GEN and AVG, and its points."""
    rows = []
    refs = {score: reference(points, score, offset, ref) for score in SCORES}
    for name, group in groups(points):
        row = {"method": name if name == ALL else method_label(name), "n_points": len(group)}
        for score, label in SCORES.items():
            scored = _scored(group, score)
            row[f"HV {label}"] = hypervolume(scored[["bytes_saved", score]].to_numpy(), refs[score]) \
                if len(scored) else 0.0
        rows.append(row)
    table = pd.DataFrame(rows, columns=["method", "n_points", *(f"HV {label}" for label in SCORES.values())])
    where = "; ".join(f"{label} {refs[s][1]:.1f}" for s, label in SCORES.items())
    table.attrs["reference"] = (f"Hypervolume over (fraction of the uncompressed model's bytes saved, score), "
                                f"reference point {reference_rule(offset, ref)}: {where}.")
    return table


# ---------------------------------------------------------------- plot

def plot_bytes_frontiers(points: pd.DataFrame, out_stem, skipped: int = 0, budgets=BUDGETS) -> list[Path]:
    """MC, GEN and AVG against weight bytes (one panel each), saved as out_stem.png and .pdf."""
    return _save(bytes_figure(points, skipped, budgets), Path(out_stem))


def bytes_figure(points: pd.DataFrame, skipped: int = 0, budgets=BUDGETS) -> Figure:
    """Every point (colour: method, marker: quant; ± 1 SE), each method's frontier (thin), the frontier over
    all points (black, dashed), the budgets as vertical lines, the uncompressed model as a star."""
    fig = Figure(figsize=(5.6 * len(SCORES), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SCORES), squeeze=False)[0]
    unit, scale = _unit(points["weight_bytes"].max() if len(points) else 0)
    colours = {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(points["method"]))}
    others = iter(OTHER_MARKERS * 4)
    markers = {q: MARKERS.get(q) or next(others) for q in dict.fromkeys(points["quant"])}
    for ax, (score, name) in zip(axes, SCORES.items()):
        _panel(ax, _scored(points, score), score, colours, markers, scale, budgets)
        ax.set_xlabel(f"weight bytes ({unit})")
        ax.set_ylabel(name)
        ax.set_title(_title(points, name, skipped), fontsize=9)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=6, loc="lower right")
    return fig


def _unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def _panel(ax, rows: pd.DataFrame, score: str, colours: dict, markers: dict, scale: float, budgets) -> None:
    if rows.empty:
        ax.text(0.5, 0.5, "no runs with weight bytes", ha="center", va="center", transform=ax.transAxes)
        return
    x = lambda frame: frame["weight_bytes"].to_numpy(float) / scale
    base = rows[is_uncompressed(rows)]
    for (method, quant), group in rows[~is_uncompressed(rows)].groupby(["method", "quant"], sort=False):
        errors = np.nan_to_num(group[f"{score}_stderr"].to_numpy(float))
        ax.errorbar(x(group), group[score], yerr=errors, fmt="none", ecolor=colours[method], elinewidth=0.7,
                    capsize=1.5, alpha=0.6, zorder=1)
        ax.scatter(x(group), group[score], color=colours[method], marker=markers[quant], s=26, alpha=0.75,
                   label=method_label(with_quant(method, quant)), zorder=2)
    for method, group in rows.groupby("method", sort=False):
        front = frontier_of(group, score)
        ax.step(x(front), front[score], where="post", color=colours[method], linewidth=0.9, alpha=0.8)
    front = frontier_of(rows, score)
    ax.step(x(front), front[score], where="post", color="black", linewidth=1.6, linestyle="--",
            label="frontier (all points)", zorder=3)
    if not base.empty:
        ax.errorbar(x(base), base[score], yerr=np.nan_to_num(base[f"{score}_stderr"].to_numpy(float)), fmt="none",
                    ecolor="black", elinewidth=0.7, capsize=1.5, zorder=1)
        ax.scatter(x(base), base[score], marker="*", s=160, color="black", zorder=4,
                   label=f"{method_label(BASELINE)} (uncompressed)")
    originals = rows["bytes_before"].dropna().unique()
    if len(originals) == 1:  # one uncompressed size: the budgets as lines
        for budget in budgets:
            ax.axvline(budget * originals[0] / scale, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{100 * budget:g}%", (budget * originals[0] / scale, 1), xycoords=("data", "axes fraction"),
                        fontsize=6, color="grey", ha="left", va="top", xytext=(2, -2), textcoords="offset points")
    ax.grid(alpha=0.3)
    ax.margins(0.08)


def _title(points: pd.DataFrame, name: str, skipped: int) -> str:
    head = f"{name} against weight bytes"
    notes = []
    if skipped:
        notes.append(f"{skipped} run(s) without bytes left out")
    if len(points) and bool(points["mixed_evals"].any()):
        notes.append("MIXED EVALS: not comparable")
    if len(points) and bool(points["mixed_settings"].any()):
        notes.append("MIXED SETTINGS: not like with like")
    return head + (f"\n{'; '.join(notes)}" if notes else "")
