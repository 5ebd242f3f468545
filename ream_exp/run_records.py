"""What a run directory records about its run, and what a relaunch reads back from it.

    identity.json   run_identity at the run's start (write_identity): what a relaunch must match to skip it
    metrics.json    "status": "done" once the run finished (finished_run, finished_metrics read it)
    error.txt       the traceback of a failed run (record_failure)

A relaunch into a directory whose run finished with the same identity skips it; one whose results are
another config's is refused (RunDirTaken). What an unfinished attempt left (a crash, a kill, Ctrl-C, a
damaged metrics.json), its W&B run directory included, is moved to attempts/<time>-<unique>/
(rundir.set_aside), never deleted; only a streamed run's finished layers stay for the relaunch to
continue from.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .atomic import write_json
from .identity import config_digest, digest, run_identity
from .rundir import RunDirRefusal, RunDirTaken, set_aside
from .partial_checkpoint import PARTIAL, resumable

log = logging.getLogger("ream_exp")

# What an attempt writes into its run directory (wandb/: the W&B run's own files, logger=wandb)
RESULT_FILES = ("metrics.json", "plan.json", "plan_perms.pt", "checkpoint", "lm_eval", "error.txt", "wandb",
                "checkpoint_unquantized", "checkpoint.quantizing", "quant.log")
IDENTITY_FILE = "identity.json"  # run_identity at the run's start: what a relaunch must match to skip it
IDENTITY_KEY = "identity"  # the same in the logger's run config, as JSON text (analysis.settings reads it)


def saved_identity(run_dir: Path) -> dict | None:
    """The identity a run recorded in its directory (identity.json), else the one its config.yaml gives
    (directories from before identity.json; their package paths must still exist); None if neither."""
    recorded = run_dir / IDENTITY_FILE
    try:
        return json.loads(recorded.read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    saved = run_dir / "config.yaml"
    return run_identity(OmegaConf.load(saved)) if saved.exists() else None


def write_identity(run_dir: Path, cfg: DictConfig) -> dict:
    identity = run_identity(cfg)
    write_json(run_dir / IDENTITY_FILE, {"digest": digest(identity), "identity": identity})
    return identity


def finished_run(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The metrics of a run already finished in `run_dir` with this very config, else None.

    A finished run with a different config is refused: results are never overwritten. Leftovers of an
    unfinished attempt (a crash, a kill, Ctrl-C, a damaged metrics.json; its W&B run's files too) are moved
    to attempts/<time>-<unique>/, not deleted, and the run starts over; only a streamed run's finished
    layers (checkpoint.partial/ of this very config, model.stream=true) stay, for the relaunch to continue
    from them.
    """
    done = _finished_metrics(run_dir / "metrics.json")
    if done is not None:
        if saved_identity(run_dir) == run_identity(cfg):
            return done
        raise RunDirTaken(f"run directory {run_dir} already holds results of a different config; "
                          "choose another hydra.run.dir or remove it yourself")
    leftovers = [name for name in (*RESULT_FILES, PARTIAL) if (run_dir / name).exists()]
    if PARTIAL in leftovers and cfg.model.get("stream") and resumable(run_dir / PARTIAL, config_digest(cfg)):
        leftovers.remove(PARTIAL)
        log.warning("unfinished streamed attempt in %s: continuing from its finished layers", run_dir / PARTIAL)
    if leftovers:
        attempt = set_aside(run_dir, leftovers)
        log.warning("unfinished earlier attempt in %s: moved %s to %s", run_dir, ", ".join(leftovers), attempt)
    return None


def finished_metrics(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The metrics of a run finished in `run_dir` with this very config, else None. Reads only: what a
    sweeper asks before it launches a job there (the job itself goes through finished_run)."""
    done = _finished_metrics(Path(run_dir) / "metrics.json")
    if done is None:
        return None
    return done if saved_identity(Path(run_dir)) == run_identity(cfg) else None


def _finished_metrics(path: Path) -> dict | None:
    """metrics.json's content if it records a finished run; None if absent, unfinished or unreadable."""
    if not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # cut short by a kill, or written over by hand
        log.warning("unreadable %s (%s): treated as an unfinished attempt", path, exc)
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("status") == "done" else None


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """A failed run leaves its error in its own directory (never over finished results)."""
    if isinstance(exc, RunDirRefusal) or (run_dir / "metrics.json").exists():  # not this run's directory
        return
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))
