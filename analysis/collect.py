"""Collect ream-exp runs (Hydra run directories, or a W&B project) into one pandas table.

A run directory holds config.yaml (or Hydra's .hydra/config.yaml) and either metrics.json or
error.txt. Each run becomes one row (its columns: analysis.rows; a W&B project's runs:
analysis.wandb_runs). A failed run (error.txt without metrics.json, an unreadable metrics.json, or
"status": "failed") is kept with status='failed' and NaN scores so that a sweep's holes stay visible;
everything downstream drops rows without scores.

Run:  python -m analysis.collect outputs/ [more dirs] [--csv runs.csv]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd
import yaml

from analysis.rows import make_row, to_frame
from analysis.settings import recorded_identity

CONFIG_FILES = ("config.yaml", ".hydra/config.yaml")


def collect_runs(*roots) -> pd.DataFrame:
    """One row per run directory found (recursively) under the given roots."""
    rows = [run_dir_row(run_dir) for root in roots for run_dir in find_run_dirs(root)]
    return to_frame(rows)


def find_run_dirs(root):
    """Yield run directories under root in a stable (sorted) order; hidden dirs are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such run folder: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        if is_run_dir(Path(dirpath), filenames):
            dirnames.clear()  # a run's own subfolders (checkpoints, wandb/) hold no further runs
            yield Path(dirpath)
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))


def is_run_dir(path: Path, filenames) -> bool:
    has_result = "metrics.json" in filenames or "error.txt" in filenames
    return has_result and _config_path(path) is not None


def _config_path(run_dir: Path):
    return next((run_dir / name for name in CONFIG_FILES if (run_dir / name).is_file()), None)


def run_dir_row(run_dir: Path) -> dict:
    config_path = _config_path(run_dir)
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path else {}
    identity = recorded_identity(run_dir)  # None for a run dir from before identity.json: from its config
    metrics, problem = _read_metrics(run_dir / "metrics.json")
    if metrics is None:
        return make_row(config, {}, run_dir=run_dir, status="failed",
                        error=problem or _last_line(run_dir / "error.txt"), identity=identity)
    status = str(metrics.get("status", "done"))
    error = metrics.get("error") or (_last_line(run_dir / "error.txt") if status != "done" else None)
    return make_row(config, metrics, run_dir=run_dir, status=status, error=error, identity=identity)


def _read_metrics(path: Path):
    """(metrics dict, None), or (None, why not) when the file is absent or unreadable."""
    if not path.is_file():
        return None, None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable metrics.json: {exc}"
    if not isinstance(metrics, dict):
        return None, "metrics.json is not a JSON object"
    return metrics, None


def _last_line(path: Path):
    """The last non-empty line of an error file (a traceback's exception message)."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:500] if lines else "error.txt is empty"


# ---------------------------------------------------------------- command line

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+", help="folders searched recursively for run dirs")
    parser.add_argument("--csv", help="write the table here instead of printing it")
    args = parser.parse_args(argv)
    frame = collect_runs(*args.roots)
    if args.csv:
        frame.to_csv(args.csv, index=False)
    else:
        frame.to_csv(sys.stdout, index=False)


if __name__ == "__main__":
    main()
