"""Pareto frontiers and hypervolumes of compression methods in the (MC, GEN) plane (docs/algorithms.md,
"Pareto analysis").

Each method is run once per calibration mix at a given expert count; its points (MC, GEN) over the
mixes form a cloud whose non-dominated set (maximising both) is the method's frontier. The
hypervolume is the area dominated by the frontier above a reference point shared by every method at
that expert count. By default (the paper's convention, which reproduces its hypervolumes) that point
is (smallest MC - 1, smallest GEN - 1) over all compared methods' points, so it moves with the set of
methods compared; `ref=(MC, GEN)` (`--ref MC,GEN`) fixes it, so that hypervolumes of two reports can
be compared. "1" is one unit of the scores as given: collect_runs reports percentage points (as the
paper's tables), so from run dirs it is one percentage point; a CSV is taken as is (use --offset if
its units differ). Every frontier records its reference point and the rule that chose it.

Rows with method 'none' and no quantisation (the uncompressed model) and rows without both scores (failed
runs) are not compared. A quantised run is compared as its method with the quantisation ('reap@w4a16',
'none@fp8': quantisation alone; analysis.naming.with_quant), so runs of two quantisations are never averaged
and each has its own frontier (docs/bytes.md; the frontiers in bytes are analysis.bytes_frontier's).
Runs of the same (method, experts, mix) with the same settings (analysis.settings: the model and its weights,
every method, calibration and eval setting; the seed aside) are the seeds of one point and averaged into it;
their standard errors (mc_stderr, gen_stderr) are averaged too: an upper bound on the stderr of the averaged
score whatever the correlation between runs scored on the same items.

Settings: a table whose runs differ in any other setting where they share a comparison (two models, two
settings of a method on one frontier, two calibration settings besides the mix) is refused with
SettingsMismatch, naming each setting that differs (`method.group_size: 16 (3 runs: ...) vs 32 (2 runs:
...)`) and the runs of each value; allow_mixed_settings=True (--allow-mixed-settings) compares them
anyway, each run's values of those settings kept apart (never averaged together; column `setting`) and the
comparison flagged (mixed_settings). See analysis.settings for what is compared where.

Eval settings: MC and GEN are means over a suite's tasks, scored on `limit` items with some few-shot
count, and each GEN task under a protocol (prompt variant, shots, metric, filter: docs/algorithms.md, "GEN
protocol"), so points are comparable only when all of these match (columns mc_tasks / gen_tasks, eval_limit,
eval_fewshot, gen_protocol; see analysis.rows). A table whose scored rows (the baseline included) differ in any
of them is refused with EvalMismatch, naming the settings that differ and the runs of each;
allow_mixed_evals=True (--allow-mixed-evals) compares them anyway, with every point's eval setting kept
apart (never averaged together) and the comparison flagged. A column the table does not have (the
paper CSV, older tables) counts as one unknown but uniform setting.

Run:  python -m analysis.pareto --csv tests/data/paper_table.csv     (columns method,experts,mix,mc,gen)
      python -m analysis.pareto --runs outputs/ [more run folders] [--ref 40,30]
"""

import argparse
import json
import warnings

import numpy as np
import pandas as pd

from analysis.naming import NO_QUANT, quant_name, with_quant
from analysis.settings import Mismatch, SettingsMismatch, check_settings, run_name  # noqa: F401 (re-exported)

BASELINE = "none"  # method name of the uncompressed model's rows
KEYS = ["method", "experts"]
# What must match for two points to share a frontier: column -> its name in labels and messages.
EVAL_FIELDS = {"mc_tasks": "MC tasks", "gen_tasks": "GEN tasks", "eval_limit": "limit",
               "eval_fewshot": "few-shot", "gen_protocol": "GEN protocol"}
UNKNOWN = "?"  # a setting the table does not record
RUNS_NAMED = 3  # runs named per eval setting in a mismatch message
STDERRS = ["mc_stderr", "gen_stderr"]
OVERRIDE = "pass --allow-mixed-evals (allow_mixed_evals=True) to compare them flagged"


class EvalMismatch(Mismatch):
    """The points to compare were scored with different eval settings (task sets, limit, few-shot, GEN
    protocol)."""


TaskSetMismatch = EvalMismatch  # its name when task sets were the only setting checked


# ---------------------------------------------------------------- geometry

def _as_points(points) -> np.ndarray:
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if not np.isfinite(pts).all():
        raise ValueError("Pareto points must be finite (drop failed runs first)")
    return pts


def pareto_front(points) -> np.ndarray:
    """Indices of the non-dominated points (maximise both coordinates).

    p dominates q when p >= q in both coordinates and p > q in one. Identical points do not dominate
    each other, so all copies of a frontier point are kept. The indices come sorted by the first
    coordinate ascending (so the second descends along the front), ties by index: deterministic.
    """
    pts = _as_points(points)
    at_least = (pts[:, None, :] >= pts[None, :, :]).all(axis=2)  # [j, i]: j >= i everywhere
    better = (pts[:, None, :] > pts[None, :, :]).any(axis=2)     # [j, i]: j > i somewhere
    dominated = (at_least & better).any(axis=0)
    keep = np.flatnonzero(~dominated)
    return keep[np.lexsort((keep, pts[keep, 0]))]


def hypervolume(points, ref) -> float:
    """Exact area of the union of the boxes [ref, p] over the points (2-D, maximising both).

    Points not strictly above ref in both coordinates add nothing. Sweeping the frontier by
    ascending x, the slab (x_prev, x_i] is covered up to y_i, the frontier's height there.
    """
    ref = np.asarray(ref, dtype=float).reshape(2)
    pts = _as_points(points)
    pts = pts[(pts > ref).all(axis=1)]
    area, x_prev = 0.0, ref[0]
    for x, y in pts[pareto_front(pts)]:
        area += (x - x_prev) * (y - ref[1])
        x_prev = x
    return float(area)


# ---------------------------------------------------------------- tables of runs

def compared_points(df: pd.DataFrame, allow_mixed_evals: bool = False,
                    allow_mixed_settings: bool = False) -> pd.DataFrame:
    """One row per (method, experts, mix, eval setting, setting) with finite MC and GEN, seeds averaged
    (their stderrs too, NaN where unknown); baseline dropped. Columns eval_setting (its label), setting
    (the run's values of the settings that differ, '' when none do), mixed_evals and mixed_settings (the
    table holds several) are added. Raises EvalMismatch when the eval settings differ, unless
    allow_mixed_evals, and SettingsMismatch when other settings do, unless allow_mixed_settings."""
    scored = df[df["mc"].notna() & df["gen"].notna()]
    mixed = check_evals(scored, allow_mixed_evals)
    mixed_settings, settings = check_settings(scored, allow_mixed_settings)
    keep = ~is_uncompressed(scored) & scored["experts"].notna()
    data, settings = scored[keep], settings.to_numpy()[keep.to_numpy()]  # positions: the index may repeat
    data = data.assign(method=[with_quant(m, q) for m, q in zip(data["method"], quants(data))],
                       experts=data["experts"].astype(int), mix=data["mix"].astype(str),
                       eval_setting=eval_labels(data), setting=settings,
                       **{c: pd.to_numeric(data[c], errors="coerce") if c in data else np.nan for c in STDERRS})
    points = data.groupby(KEYS + ["mix", "eval_setting", "setting"], sort=False,
                          as_index=False)[["mc", "gen", *STDERRS]].mean()
    return points.assign(mixed_evals=mixed, mixed_settings=mixed_settings)


def quants(df: pd.DataFrame) -> pd.Series:
    """Each row's quant.name ('none' where the table has no quant column: runs from before it)."""
    if "quant" not in df:
        return pd.Series(NO_QUANT, index=df.index, dtype=object)
    return df["quant"].map(quant_name)


def is_uncompressed(df: pd.DataFrame) -> pd.Series:
    """The rows of the uncompressed model: method 'none' and not quantised."""
    return (df["method"] == BASELINE) & (quants(df) == NO_QUANT)


def _setting(df: pd.DataFrame, column: str) -> pd.Series:
    """A setting column as text, UNKNOWN where the table does not say; numbers as %g (50.0 -> '50')."""
    if column not in df:
        return pd.Series(UNKNOWN, index=df.index, dtype=object)
    text = df[column].map(lambda v: f"{v:g}" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                          else str(v))
    return text.where(df[column].notna(), UNKNOWN).astype(object)


def eval_labels(df: pd.DataFrame, fields=None) -> pd.Series:
    """Each row's eval setting as one label, e.g. 'MC tasks: arc_easy+mmlu | GEN tasks: gsm8k | limit: 50 |
    few-shot: ...' ('?' = unknown); `fields` picks the columns (default: all of EVAL_FIELDS)."""
    fields = list(fields or EVAL_FIELDS)
    labels = pd.Series("", index=df.index, dtype=object)
    for i, column in enumerate(fields):
        labels = labels + ("" if i == 0 else " | ") + f"{EVAL_FIELDS[column]}: " + _setting(df, column)
    return labels


def check_evals(scored: pd.DataFrame, allow_mixed: bool = False) -> bool:
    """Whether the scored rows hold more than one eval setting; raises EvalMismatch (one line naming
    the settings that differ, the runs of each, and the override) if they do and mixing is not
    allowed, else warns."""
    differing = [c for c in EVAL_FIELDS if _setting(scored, c).nunique() > 1]
    if not differing:
        return False
    labels = eval_labels(scored, differing)
    described = "; ".join(_describe(scored[labels == label], label) for label in dict.fromkeys(labels))
    what = ", ".join(EVAL_FIELDS[c] for c in differing)
    if not allow_mixed:
        raise EvalMismatch(f"these runs were evaluated with different eval settings ({what} differ), so their "
                           f"MC/GEN are not comparable: {described}. Rerun them with one eval config, compare "
                           f"each setting on its own, or {OVERRIDE}")
    warnings.warn(f"comparing points evaluated with different eval settings ({what}; flagged): {described}",
                  stacklevel=3)
    return True


def _describe(rows: pd.DataFrame, label: str) -> str:
    names = [_run_name(row) for _, row in rows.head(RUNS_NAMED).iterrows()]
    more = f" and {len(rows) - RUNS_NAMED} more" if len(rows) > RUNS_NAMED else ""
    return f"[{label}] {len(rows)} run(s): {', '.join(names)}{more}"


_run_name = run_name


def reference_points(points: pd.DataFrame, offset: float = 1.0, ref=None) -> dict:
    """experts -> the reference point: `ref` (MC, GEN) when given, else (min MC - offset, min GEN - offset)
    over every method at that expert count (the paper's convention)."""
    if ref is not None:
        fixed = tuple(float(v) for v in np.asarray(ref, dtype=float).reshape(2))
        return {int(e): fixed for e in points["experts"].unique()}
    lows = points.groupby("experts")[["mc", "gen"]].min() - offset
    return {int(e): (float(r.mc), float(r.gen)) for e, r in lows.iterrows()}


def reference_rule(offset: float = 1.0, ref=None) -> str:
    """How the reference point was chosen, in words (every table carries it)."""
    if ref is not None:
        mc, gen = (float(v) for v in np.asarray(ref, dtype=float).reshape(2))
        return f"fixed at (MC, GEN) = ({mc:g}, {gen:g})"
    return f"{offset:g} below the smallest MC and GEN of the methods compared at each expert count"


def frontiers(df: pd.DataFrame, offset: float = 1.0, allow_mixed_evals: bool = False, ref=None,
              allow_mixed_settings: bool = False) -> pd.DataFrame:
    """Per (method, experts): n_points, frontier_size, hypervolume, reference point (ref_mc, ref_gen,
    ref_rule), the frontier, the eval settings and the settings of its points and whether the comparison
    mixes them (see compared_points). `ref` fixes the reference point; by default it is the minima - offset."""
    points = compared_points(df, allow_mixed_evals, allow_mixed_settings)
    refs = reference_points(points, offset, ref)
    rule = reference_rule(offset, ref)
    rows = [_frontier_row(method, experts, group, refs[experts], rule)
            for (method, experts), group in points.groupby(KEYS, sort=False)]
    columns = KEYS + ["n_points", "frontier_size", "hypervolume", "ref_mc", "ref_gen", "ref_rule", "frontier",
                      "evals", "mixed_evals", "settings", "mixed_settings"]
    return pd.DataFrame(rows, columns=columns)


def _frontier_row(method, experts, group: pd.DataFrame, ref, rule: str) -> dict:
    xy = group[["mc", "gen"]].to_numpy()
    front = group.iloc[pareto_front(xy)]
    return {
        "method": method, "experts": int(experts), "n_points": len(group),
        "frontier_size": len(front), "hypervolume": hypervolume(xy, ref),
        "ref_mc": ref[0], "ref_gen": ref[1], "ref_rule": rule,
        "frontier": [{"mix": m, "mc": float(x), "gen": float(y), **_stderrs(se_x, se_y), **_point_setting(s)}
                     for m, x, y, se_x, se_y, s in zip(front["mix"], front["mc"], front["gen"],
                                                       front["mc_stderr"], front["gen_stderr"], front["setting"])],
        "evals": sorted(set(group["eval_setting"])),
        "mixed_evals": bool(group["mixed_evals"].any()),
        "settings": sorted(set(group["setting"]) - {""}),
        "mixed_settings": bool(group["mixed_settings"].any()),
    }


def _point_setting(label: str) -> dict:
    """A frontier point's settings label, when the comparison mixes settings and it has one."""
    return {"setting": label} if label else {}


def _stderrs(mc_stderr, gen_stderr) -> dict:
    return {k: float(v) for k, v in (("mc_stderr", mc_stderr), ("gen_stderr", gen_stderr)) if np.isfinite(v)}


def frontiers_json(table: pd.DataFrame) -> list:
    """The frontiers table as JSON-ready records (the CLI's output)."""
    return [
        {"method": str(r.method), "experts": int(r.experts), "hypervolume": float(r.hypervolume),
         "frontier_size": int(r.frontier_size), "n_points": int(r.n_points),
         "reference": [float(r.ref_mc), float(r.ref_gen)], "reference_rule": str(r.ref_rule),
         "frontier": r.frontier, "evals": list(r.evals), "mixed_evals": bool(r.mixed_evals),
         "settings": list(r.settings), "mixed_settings": bool(r.mixed_settings)}
        for r in table.itertuples(index=False)
    ]


def parse_ref(text: str) -> tuple[float, float]:
    """'MC,GEN' (e.g. '40,30.5') -> (40.0, 30.5); argparse type of --ref."""
    try:
        mc, gen = (float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ref {text!r}: give the reference point as MC,GEN, e.g. --ref 40,30") \
            from None
    return mc, gen


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """--offset, --ref, --allow-mixed-evals and --allow-mixed-settings, shared by analysis.pareto and
    analysis.report."""
    parser.add_argument("--offset", type=float, default=1.0,
                        help="reference point = minima - offset (the paper's convention; default 1)")
    parser.add_argument("--ref", type=parse_ref, default=None, metavar="MC,GEN",
                        help="fix the hypervolume's reference point instead, so reports can be compared")
    parser.add_argument("--allow-mixed-evals", "--allow-mixed-task-sets", dest="allow_mixed_evals",
                        action="store_true", help="compare runs with different eval settings (task sets, limit, "
                        "few-shot), flagged, instead of refusing")
    parser.add_argument("--allow-mixed-settings", dest="allow_mixed_settings", action="store_true",
                        help="compare runs that differ in other settings than the seed and the calibration mix "
                        "(model, method settings, calibration settings), kept apart and flagged, instead of refusing")


# ---------------------------------------------------------------- command line

def read_points_csv(path) -> pd.DataFrame:
    data = pd.read_csv(path, dtype={"method": str, "mix": str})
    missing = {"method", "experts", "mix", "mc", "gen"} - set(data.columns)
    if missing:
        raise SystemExit(f"{path}: missing column(s) {sorted(missing)}")
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pareto frontier + hypervolume per (method, experts).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="table with columns method, experts, mix, mc, gen (values as given)")
    source.add_argument("--runs", nargs="+", help="folders of run dirs (scores in percentage points)")
    add_comparison_arguments(parser)
    args = parser.parse_args(argv)
    if args.csv:
        data = read_points_csv(args.csv)
    else:
        from analysis.collect import collect_runs

        data = collect_runs(*args.runs)
    try:
        table = frontiers(data, args.offset, args.allow_mixed_evals, ref=args.ref,
                          allow_mixed_settings=args.allow_mixed_settings)
    except Mismatch as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(frontiers_json(table), indent=2))


if __name__ == "__main__":
    main()
