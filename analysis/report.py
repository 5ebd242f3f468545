"""One folder with everything the paper's Pareto analysis needs, from run dirs (or W&B).

Writes into --out: runs.csv (every run, failed ones included), frontiers.json (per method and expert
count: hypervolume, frontier size, frontier mixes with their stderrs, reference point and its rule),
frontiers.png/.pdf, and the tables hypervolume.md/.tex (with the reference point used), best_gen.md/.tex
and mix_table.md/.tex ("61.0 ± 0.8" where stderrs are known); and in bytes (analysis.bytes_frontier,
docs/bytes.md): bytes_frontiers.png/.pdf (MC, GEN, AVG against weight bytes: every point, each method's
frontier, the frontier over all), bytes_frontiers.json, bytes_budgets.md/.tex (the best point within each
--budgets fraction of the uncompressed model's bytes) and bytes_hypervolume.md/.tex (over bytes saved and
score); runs without recorded bytes are left out of those, and counted. Scores are percentage points (see
analysis.collect). The hypervolume's reference point is the paper's (minima - --offset) unless
--ref MC,GEN fixes it. Runs with different eval settings (task sets, limit, few-shot) are refused (one
error naming what differs and the runs of each setting) unless --allow-mixed-evals, which writes the
report with those comparisons flagged (frontiers.json's "mixed_evals", an eval_setting column in the
tables, the plot titles). Only seeds are averaged: runs that differ in any other setting besides the
calibration mix (two models, two settings of a method, two calibration settings; analysis.settings)
are refused the same way unless --allow-mixed-settings (frontiers.json's "mixed_settings" and each
point's "setting", a setting/settings column in the tables, the plot titles and labels).

Run:  python -m analysis.report --runs outputs/ --out outputs/report [--ref 40,30]
      python -m analysis.report --wandb-project ream-exp [--wandb-entity ME] --out outputs/report
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis import tables
from analysis.bytes_frontier import (BUDGETS, bytes_budget_table, bytes_frontiers, bytes_hypervolume_table,
                                     bytes_points, plot_bytes_frontiers)
from analysis.collect import collect_runs
from analysis.pareto import Mismatch, add_comparison_arguments, check_evals, check_settings, frontiers, frontiers_json
from analysis.plots import plot_frontiers
from analysis.wandb_runs import collect_wandb


def write_report(runs: pd.DataFrame, out_dir, offset: float = 1.0,
                 allow_mixed_evals: bool = False, ref=None, allow_mixed_settings: bool = False,
                 budgets=BUDGETS) -> list[Path]:
    """Write every artefact for the collected runs into out_dir; returns the written paths.
    Raises EvalMismatch (SettingsMismatch) before writing anything when the runs' eval settings (other
    settings) differ and mixing them is not allowed. `ref` (MC, GEN) fixes the hypervolume's reference point;
    `budgets` are the fractions of the uncompressed model's bytes of the budget table."""
    mixed, settings = allow_mixed_evals, allow_mixed_settings
    scored = runs[runs["mc"].notna() & runs["gen"].notna()]
    check_evals(scored, mixed)
    check_settings(scored, settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    fronts = frontiers_json(frontiers(runs, offset, mixed, ref, settings))
    (out / "frontiers.json").write_text(json.dumps(fronts, indent=2) + "\n")
    written = [out / "runs.csv", out / "frontiers.json", *plot_frontiers(runs, out / "frontiers", mixed, settings)]
    for name, table in (("hypervolume", tables.hypervolume_table(runs, offset, mixed, ref, settings)),
                        ("best_gen", tables.best_gen_table(runs, mixed, settings)),
                        ("mix_table", tables.mix_table(runs, mixed, settings))):
        (out / f"{name}.md").write_text(tables.to_markdown(table) + "\n")
        (out / f"{name}.tex").write_text(tables.to_latex(table))
        written += [out / f"{name}.md", out / f"{name}.tex"]
    return written + write_bytes_report(runs, out, offset, mixed, ref, settings, budgets)


def write_bytes_report(runs: pd.DataFrame, out: Path, offset: float = 1.0, allow_mixed_evals: bool = False,
                       ref=None, allow_mixed_settings: bool = False, budgets=BUDGETS) -> list[Path]:
    """The frontiers in bytes (analysis.bytes_frontier) into `out`; returns the written paths."""
    points, skipped = bytes_points(runs, allow_mixed_evals, allow_mixed_settings)
    if skipped:
        print(f"{skipped} scored run(s) without recorded weight bytes (older metrics.json): "
              "left out of the frontiers in bytes")
    fronts = bytes_frontiers(points, skipped, offset, ref, budgets)
    (out / "bytes_frontiers.json").write_text(json.dumps(fronts, indent=2) + "\n")
    written = [out / "bytes_frontiers.json", *plot_bytes_frontiers(points, out / "bytes_frontiers", skipped, budgets)]
    note = f" {skipped} scored run(s) without recorded weight bytes left out." if skipped else ""
    budget = bytes_budget_table(points, budgets)
    budget.attrs["reference"] = ("Best point within each budget (a fraction of the uncompressed model's weight "
                                 "bytes), per score." + note)
    volume = bytes_hypervolume_table(points, offset, ref)
    volume.attrs["reference"] += note
    for name, table in (("bytes_budgets", budget), ("bytes_hypervolume", volume)):
        (out / f"{name}.md").write_text(tables.to_markdown(table) + "\n")
        (out / f"{name}.tex").write_text(tables.to_latex(table))
        written += [out / f"{name}.md", out / f"{name}.tex"]
    return written


def parse_budgets(text: str) -> tuple[float, ...]:
    """'0.75,0.5,0.25' -> (0.75, 0.5, 0.25); argparse type of --budgets (each in (0, 1])."""
    try:
        budgets = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        budgets = ()
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: give fractions of the uncompressed model's bytes "
                                         "in (0, 1], e.g. --budgets 0.75,0.5,0.25")
    return budgets


def load_runs(args) -> pd.DataFrame:
    frames = []
    if args.runs:
        frames.append(collect_runs(*args.runs))
    if args.wandb_project:
        frames.append(collect_wandb(args.wandb_project, args.wandb_entity))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Collect runs -> frontiers, plots and tables.")
    parser.add_argument("--runs", nargs="+", help="folders searched recursively for run dirs")
    parser.add_argument("--wandb-project", help="read runs from this W&B project (needs network)")
    parser.add_argument("--wandb-entity")
    parser.add_argument("--out", default="outputs/report", help="folder for the report files")
    add_comparison_arguments(parser)
    parser.add_argument("--budgets", type=parse_budgets, default=BUDGETS, metavar="F,F,...",
                        help="memory budgets of the bytes table, as fractions of the uncompressed model's weight "
                        "bytes (default 0.75,0.5,0.25)")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb_project:
        parser.error("give --runs and/or --wandb-project")
    runs = load_runs(args)
    done = int((runs["status"] == "done").sum())
    print(f"{len(runs)} runs ({done} done, {len(runs) - done} not done)")
    try:
        written = write_report(runs, args.out, args.offset, args.allow_mixed_evals, args.ref,
                               args.allow_mixed_settings, args.budgets)
    except Mismatch as exc:
        raise SystemExit(f"error: {exc}") from None
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
