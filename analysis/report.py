"""One folder with everything the paper's Pareto analysis needs, from run dirs (or W&B).

Writes into --out: runs.csv (every run, failed ones included), frontiers.json (per method and expert
count: hypervolume, frontier size, frontier mixes, reference point), frontiers.png/.pdf, and the
tables best_gen.md/.tex and mix_table.md/.tex. Scores are percentage points (see analysis.collect).
Runs scored on different task sets are refused (one error naming the runs of each set) unless
--allow-mixed-task-sets, which writes the report with those comparisons flagged (frontiers.json's
"mixed_task_sets", a task_set column in the tables, the plot titles).

Run:  python -m analysis.report --runs outputs/ --out outputs/report
      python -m analysis.report --wandb-project ream-exp [--wandb-entity ME] --out outputs/report
"""

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis import tables
from analysis.collect import collect_runs, collect_wandb
from analysis.pareto import TaskSetMismatch, check_task_sets, frontiers, frontiers_json
from analysis.plots import plot_frontiers


def write_report(runs: pd.DataFrame, out_dir, offset: float = 1.0,
                 allow_mixed_task_sets: bool = False) -> list[Path]:
    """Write every artefact for the collected runs into out_dir; returns the written paths.
    Raises TaskSetMismatch before writing anything when the runs' task sets differ (and mixing is
    not allowed)."""
    mixed = allow_mixed_task_sets
    check_task_sets(runs[runs["mc"].notna() & runs["gen"].notna()], mixed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    fronts = frontiers_json(frontiers(runs, offset, mixed))
    (out / "frontiers.json").write_text(json.dumps(fronts, indent=2) + "\n")
    written = [out / "runs.csv", out / "frontiers.json", *plot_frontiers(runs, out / "frontiers", mixed)]
    for name, table in (("best_gen", tables.best_gen_table(runs, mixed)),
                        ("mix_table", tables.mix_table(runs, mixed))):
        (out / f"{name}.md").write_text(tables.to_markdown(table) + "\n")
        (out / f"{name}.tex").write_text(tables.to_latex(table))
        written += [out / f"{name}.md", out / f"{name}.tex"]
    return written


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
    parser.add_argument("--offset", type=float, default=1.0, help="reference point = minima - offset")
    parser.add_argument("--allow-mixed-task-sets", action="store_true",
                        help="report runs scored on different task sets (flagged) instead of refusing")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb_project:
        parser.error("give --runs and/or --wandb-project")
    runs = load_runs(args)
    done = int((runs["status"] == "done").sum())
    print(f"{len(runs)} runs ({done} done, {len(runs) - done} not done)")
    try:
        written = write_report(runs, args.out, args.offset, args.allow_mixed_task_sets)
    except TaskSetMismatch as exc:
        raise SystemExit(f"error: {exc}") from None
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
