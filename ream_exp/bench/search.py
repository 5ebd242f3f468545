"""The mix search against the 5-mix grid on the toy: hypervolume reached after each run, side by side.

    python -m ream_exp.bench search [--method ream_official --ratio 0.25 --trials 8 --limit 50 --out DIR]

Runs, one after the other and on the same eval (eval.limit items per task), the five mixes of
sweeps/toy_pareto.yaml for one method and ratio (DIR/grid), then sweeps/toy_search.yaml with n_trials
mixes over the grid's sources general, math, code (DIR/search), both through the ream-exp command. A relaunch reuses both: finished runs are skipped
and the study continues, so a larger --trials adds runs only.

Hypervolume (analysis.pareto.hypervolume, MC and GEN in percentage points) after the first k runs of each,
in the order they ran, over one fixed reference point: the paper's convention taken over the union of
both point sets, (smallest MC - 1, smallest GEN - 1). A failed run counts as a run and adds no point; a
search trial that repeated a finished mix is not a run. Nothing is asserted: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .. import SWEEPS_DIR
from ..mix_labels import format_mix
from . import prog

SWEEPS = SWEEPS_DIR


def launch(config_name: str, sweep_dir: Path, overrides: list[str]) -> tuple[int, float]:
    """Run one multirun through ream-exp's entry point; its exit status and wall-clock seconds."""
    command = [sys.executable, "-m", "ream_exp.cli", "-m", "--config-dir", str(SWEEPS), "--config-name",
               config_name, *overrides, f"hydra.sweep.dir={sweep_dir}", "progress=false"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command)
    return done.returncode, time.perf_counter() - start


def _point(metrics: dict | None):
    scores = (metrics or {}).get("eval") or {}
    if (metrics or {}).get("status") != "done" or scores.get("mc") is None or scores.get("gen") is None:
        return None
    return 100 * float(scores["mc"]), 100 * float(scores["gen"])


def grid_points(sweep_dir: Path, format_mix) -> list:
    """(label, point or None) per grid run, in the order the runs finished (metrics.json / error.txt time);
    `format_mix` labels a run's mix."""
    runs = []
    for run_dir in sweep_dir.iterdir():
        metrics_file, error_file = run_dir / "metrics.json", run_dir / "error.txt"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            runs.append((metrics_file.stat().st_mtime, format_mix(metrics.get("mix")) or run_dir.name,
                         _point(metrics)))
        elif error_file.exists():
            runs.append((error_file.stat().st_mtime, run_dir.name, None))
    return [(name, point) for _, name, point in sorted(runs)]


def search_points(sweep_dir: Path) -> list:
    """(mix, point or None) per search run in trial order; repeats of a finished mix are not runs."""
    summary = json.loads((sweep_dir / "search.json").read_text())
    runs = []
    for trial in summary["trials"]:
        if "duplicate_of" in trial or "duplicate_of_pending" in trial:
            continue
        values = trial["values"] if trial["state"] == "COMPLETE" else None
        label = ":".join(part.split("=")[1] for part in trial["mix"].split(","))  # general=0.2,... -> 0.2:...
        runs.append((label, None if values is None else (100 * values[0], 100 * values[1])))
    return runs


def hypervolumes(points: list, ref, hypervolume) -> list[float]:
    """`hypervolume` of the first k points, k = 1 .. len(points); failed runs (None) add nothing."""
    out, seen = [], []
    for point in points:
        if point is not None:
            seen.append(point)
        out.append(hypervolume(seen, ref) if seen else 0.0)
    return out


def main(argv=None) -> None:
    # analysis/ (outside the core package, which never imports it) measures the hypervolumes; only this
    # benchmark needs it, so it is imported here, when the benchmark runs.
    from analysis.pareto import hypervolume

    parser = argparse.ArgumentParser(prog=prog("search"), description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ream_official")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--trials", type=int, default=8, help="mixes the search runs")
    parser.add_argument("--limit", type=int, default=50, help="eval.limit: items per task, for both")
    # the directory the benchmark has always used, so that a relaunch still reuses the finished runs
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_search"))
    args = parser.parse_args(argv)
    common = [f"method={args.method}", f"ratio={args.ratio}", f"eval.limit={args.limit}"]
    grid_rc, grid_s = launch("toy_pareto", args.out / "grid", common)
    search_rc, search_s = launch("toy_search", args.out / "search",  # the grid's three sources
                                 [*common, f"hydra.sweeper.n_trials={args.trials}",
                                  "hydra.sweeper.sources=[general,math,code]"])

    grid = grid_points(args.out / "grid", format_mix)
    search = search_points(args.out / "search")
    scored = [p for _, p in grid + search if p is not None]
    if not scored:
        raise SystemExit("error: no run finished with MC and GEN scores")
    ref = (min(p[0] for p in scored) - 1, min(p[1] for p in scored) - 1)
    hv_grid = hypervolumes([p for _, p in grid], ref, hypervolume)
    hv_search = hypervolumes([p for _, p in search], ref, hypervolume)

    print(f"\n{args.method}, ratio {args.ratio}, eval.limit {args.limit}; reference point "
          f"(MC {ref[0]:.1f}, GEN {ref[1]:.1f}) = union minima - 1 (paper convention over both sets)")
    print(f"grid: {len(grid)} runs in {grid_s:.0f} s (exit {grid_rc}); "
          f"search: {len(search)} runs in {search_s:.0f} s (exit {search_rc})")
    print(f"{'run':>4}  {'grid mix':<34} {'grid HV':>8}   {'search mix':<34} {'search HV':>9}")
    for k in range(max(len(grid), len(search))):
        g = (grid[k][0][:34], f"{hv_grid[k]:.1f}") if k < len(grid) else ("", "")
        s = (search[k][0][:34], f"{hv_search[k]:.1f}") if k < len(search) else ("", "")
        print(f"{k + 1:>4}  {g[0]:<34} {g[1]:>8}   {s[0]:<34} {s[1]:>9}")
    target = hv_grid[-1] if hv_grid else 0.0
    reached = next((k + 1 for k, hv in enumerate(hv_search) if hv >= target), None)
    print(f"grid's hypervolume {target:.1f} after {len(grid)} runs; search: "
          + (f"reached after {reached} runs" if reached else f"not reached in {len(search)} runs "
             f"(best {max(hv_search, default=0.0):.1f})"))


if __name__ == "__main__":
    main()
