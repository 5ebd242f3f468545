"""Pareto frontiers and hypervolumes of compression methods in the (MC, GEN) plane (SPEC section 8).

Each method is run once per calibration mix at a given expert count; its points (MC, GEN) over the
mixes form a cloud whose non-dominated set (maximising both) is the method's frontier. The
hypervolume is the area dominated by the frontier above a reference point shared by every method at
that expert count: (smallest MC - 1, smallest GEN - 1) over all compared methods' points. "1" is one
unit of the scores as given: collect_runs reports percentage points (as the paper's tables), so from
run dirs it is one percentage point; a CSV is taken as is (use --offset if its units differ).

Rows with method 'none' (the uncompressed model) and rows without both scores (failed runs) are not
compared. Repeated runs of the same (method, experts, mix), e.g. seeds, are averaged into one point.

Task sets: MC and GEN are means over a suite's tasks, so points are comparable only when they were
scored on the same tasks (columns mc_tasks / gen_tasks, see analysis.collect). A table whose scored
rows (the baseline included) hold different task sets is refused with TaskSetMismatch, naming the
runs of each set; allow_mixed_task_sets=True (--allow-mixed-task-sets) compares them anyway, with
every point's task set kept apart (never averaged together) and the comparison flagged. A table
without those columns (the paper CSV, older tables) counts as one unknown but uniform task set.

Run:  python -m analysis.pareto --csv tests/data/paper_table.csv     (columns method,experts,mix,mc,gen)
      python -m analysis.pareto --runs outputs/ [more run folders]
"""

import argparse
import json
import warnings

import numpy as np
import pandas as pd

BASELINE = "none"  # method name of the uncompressed model's rows
KEYS = ["method", "experts"]
TASK_SET_COLUMNS = {"mc_tasks": "MC", "gen_tasks": "GEN"}
UNKNOWN = "?"  # a suite whose task set the table does not record
RUNS_NAMED = 3  # runs named per task set in a mismatch message


class TaskSetMismatch(ValueError):
    """The points to compare were scored on different task sets."""


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

def compared_points(df: pd.DataFrame, allow_mixed_task_sets: bool = False) -> pd.DataFrame:
    """One row per (method, experts, mix, task_set) with finite MC and GEN, seeds averaged; baseline
    dropped. Columns task_set (its label) and mixed_task_sets (the table holds several) are added.
    Raises TaskSetMismatch when the task sets differ, unless allow_mixed_task_sets."""
    scored = df[df["mc"].notna() & df["gen"].notna()]
    mixed = check_task_sets(scored, allow_mixed_task_sets)
    data = scored[(scored["method"] != BASELINE) & scored["experts"].notna()]
    data = data.assign(experts=data["experts"].astype(int), mix=data["mix"].astype(str),
                       task_set=task_set_labels(data))
    points = data.groupby(KEYS + ["mix", "task_set"], sort=False, as_index=False)[["mc", "gen"]].mean()
    return points.assign(mixed_task_sets=mixed)


def task_set_labels(df: pd.DataFrame) -> pd.Series:
    """Each row's task sets as one label, e.g. 'MC: arc_easy+mmlu | GEN: gsm8k' ('?' = unknown)."""
    parts = []
    for column, suite in TASK_SET_COLUMNS.items():
        values = df[column] if column in df else pd.Series(None, index=df.index, dtype=object)
        parts.append(f"{suite}: " + values.astype(object).where(values.notna(), UNKNOWN).astype(str))
    return parts[0] + " | " + parts[1]


def check_task_sets(scored: pd.DataFrame, allow_mixed: bool = False) -> bool:
    """Whether the scored rows hold more than one task set; raises TaskSetMismatch if they do and
    mixing is not allowed, else warns."""
    labels = task_set_labels(scored)
    if labels.nunique() <= 1:
        return False
    described = "; ".join(_describe(scored[labels == label], label) for label in dict.fromkeys(labels))
    if not allow_mixed:
        raise TaskSetMismatch(
            f"these runs were scored on different task sets, so their MC/GEN means are not "
            f"comparable: {described}. Rerun them with one eval config, compare each set on its own, "
            "or pass allow_mixed_task_sets=True (--allow-mixed-task-sets) to compare them flagged"
        )
    warnings.warn(f"comparing points scored on different task sets (flagged): {described}",
                  stacklevel=3)
    return True


def _describe(rows: pd.DataFrame, label: str) -> str:
    names = [_run_name(row) for _, row in rows.head(RUNS_NAMED).iterrows()]
    more = f" and {len(rows) - RUNS_NAMED} more" if len(rows) > RUNS_NAMED else ""
    return f"[{label}] {len(rows)} run(s): {', '.join(names)}{more}"


def _run_name(row) -> str:
    run_dir = row.get("run_dir")
    if isinstance(run_dir, str) and run_dir:
        return run_dir
    return f"{row.get('method')}/{row.get('experts')}/{row.get('mix')}"


def reference_points(points: pd.DataFrame, offset: float = 1.0) -> dict:
    """experts -> (min MC - offset, min GEN - offset) over every method at that expert count."""
    lows = points.groupby("experts")[["mc", "gen"]].min() - offset
    return {int(e): (float(r.mc), float(r.gen)) for e, r in lows.iterrows()}


def frontiers(df: pd.DataFrame, offset: float = 1.0, allow_mixed_task_sets: bool = False) -> pd.DataFrame:
    """Per (method, experts): n_points, frontier_size, hypervolume, reference point, the frontier,
    the task sets of its points and whether the comparison mixes task sets (see compared_points)."""
    points = compared_points(df, allow_mixed_task_sets)
    refs = reference_points(points, offset)
    rows = [_frontier_row(method, experts, group, refs[experts])
            for (method, experts), group in points.groupby(KEYS, sort=False)]
    columns = KEYS + ["n_points", "frontier_size", "hypervolume", "ref_mc", "ref_gen", "frontier",
                      "task_sets", "mixed_task_sets"]
    return pd.DataFrame(rows, columns=columns)


def _frontier_row(method, experts, group: pd.DataFrame, ref) -> dict:
    xy = group[["mc", "gen"]].to_numpy()
    front = group.iloc[pareto_front(xy)]
    return {
        "method": method, "experts": int(experts), "n_points": len(group),
        "frontier_size": len(front), "hypervolume": hypervolume(xy, ref),
        "ref_mc": ref[0], "ref_gen": ref[1],
        "frontier": [{"mix": m, "mc": float(x), "gen": float(y)}
                     for m, x, y in zip(front["mix"], front["mc"], front["gen"])],
        "task_sets": sorted(set(group["task_set"])),
        "mixed_task_sets": bool(group["mixed_task_sets"].any()),
    }


def frontiers_json(table: pd.DataFrame) -> list:
    """The frontiers table as JSON-ready records (the CLI's output)."""
    return [
        {"method": str(r.method), "experts": int(r.experts), "hypervolume": float(r.hypervolume),
         "frontier_size": int(r.frontier_size), "n_points": int(r.n_points),
         "reference": [float(r.ref_mc), float(r.ref_gen)], "frontier": r.frontier,
         "task_sets": list(r.task_sets), "mixed_task_sets": bool(r.mixed_task_sets)}
        for r in table.itertuples(index=False)
    ]


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
    parser.add_argument("--offset", type=float, default=1.0, help="reference point = minima - offset")
    parser.add_argument("--allow-mixed-task-sets", action="store_true",
                        help="compare points scored on different task sets (flagged) instead of refusing")
    args = parser.parse_args(argv)
    if args.csv:
        data = read_points_csv(args.csv)
    else:
        from analysis.collect import collect_runs

        data = collect_runs(*args.runs)
    try:
        table = frontiers(data, args.offset, args.allow_mixed_task_sets)
    except TaskSetMismatch as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(frontiers_json(table), indent=2))


if __name__ == "__main__":
    main()
