"""One ream-exp run, from a Hydra config to a compressed checkpoint and its scores.

    ream-exp                                   # toy model, default method, ratio 0.25, eval=toy
    ream-exp model=local model.path=DIR method=reap ratio=0.5 eval=none logger=none hydra.run.dir=OUT

The run directory gets config.yaml (resolved), plan.json, metrics.json and checkpoint/ (unless save=false).
Tests call `run(cfg)` directly; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import PACKAGE_DIR
from .calib import validate_calib
from .calib.cache import cached_calibration
from .checkpoint import save_checkpoint, write_model_card
from .config import check_expert_counts, check_model_path, check_ratio
from .methods import Context, get_method
from .moe import apply_plan, moe_layers
from .pipeline import (Timer, baseline_key, count_parameters, load_model, load_model_config, resolve_device,
                       score_table, stats_key, write_json)

log = logging.getLogger("ream_exp")

RESULT_FILES = ("metrics.json", "plan.json", "plan_perms.pt", "checkpoint", "error.txt")
# Settings that change how a run is shown or logged, not what it computes.
PRESENTATION_KEYS = ("progress", "logger")


def experiment_config(cfg) -> dict:
    """The resolved config without presentation settings: what decides whether two runs are the same."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in PRESENTATION_KEYS}


def finished_run(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The metrics of a run already finished in `run_dir` with this very config, else None.

    A finished run with a different config is refused: results are never overwritten. Leftovers of an
    unfinished attempt (a crash, a kill) are moved to attempts/<time>/, not deleted, and the run starts over.
    """
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("status") == "done":
            saved = run_dir / "config.yaml"
            if saved.exists() and experiment_config(OmegaConf.load(saved)) == experiment_config(cfg):
                return done
            raise FileExistsError(f"run directory {run_dir} already holds results of a different config; "
                                  "choose another hydra.run.dir or remove it yourself")
    leftovers = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if leftovers:
        attempt = run_dir / "attempts" / time.strftime("%Y%m%d-%H%M%S")
        attempt.mkdir(parents=True, exist_ok=True)
        for name in leftovers:
            os.replace(run_dir / name, attempt / name)
        log.warning("unfinished earlier attempt in %s: moved %s to %s", run_dir, ", ".join(leftovers), attempt)
    return None


def validate(cfg: DictConfig):
    """Every check that can fail before a model is loaded. Returns the model's transformers config."""
    from .evaluate import check_tasks

    ratio = check_ratio(cfg.ratio)
    method = get_method(cfg.method.name)
    if getattr(method, "NEEDS_CALIBRATION", True):
        validate_calib(cfg.calib)
    check_tasks(cfg.eval)
    check_model_path(cfg.model)
    model_config = load_model_config(cfg.model)
    num_experts, n_keep = check_expert_counts(model_config, ratio)
    if hasattr(method, "check"):  # method-specific settings, e.g. REAM's group size against N and N'
        method.check(OmegaConf.to_container(cfg.method, resolve=True), num_experts, n_keep)
    return model_config


def _evaluate(model, tokenizer, cfg, checkpoint_dir: Path | None = None) -> dict:
    from .evaluate import evaluate

    return evaluate(model, tokenizer, cfg.eval, checkpoint_dir=checkpoint_dir)


def cached_baseline(model, tokenizer, cfg: DictConfig, timer: Timer) -> dict | None:
    """Scores of the uncompressed model, evaluated once per (model, eval config) and cached on disk."""
    if not cfg.get("baseline") or not list(cfg.eval.get("tasks") or []) or cfg.method.name == "none":
        return None
    path = Path(cfg.cache_dir) / "baseline" / f"{baseline_key(cfg.model, cfg.eval)}.json"
    if path.exists():
        return json.loads(path.read_text())
    with timer("baseline_eval"):
        scores = _evaluate(model, tokenizer, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, scores)
    return scores


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Load -> calibrate -> compress -> save -> evaluate; returns (and writes) metrics.json's content."""
    from .tracking import make_logger

    run_dir = Path(run_dir or cfg.get("run_dir") or "outputs/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    done = finished_run(run_dir, cfg)
    if done is not None:
        log.info("already finished with this config, skipped: %s", run_dir)
        print(f"skipped (already finished with the same config): {run_dir}")
        return done
    validate(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    torch.manual_seed(int(cfg.seed))
    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True))
    timer = Timer()
    try:
        metrics = _run_stages(cfg, run_dir, timer, logger)
    finally:
        logger.finish()
    return metrics


def _run_stages(cfg: DictConfig, run_dir: Path, timer: Timer, logger) -> dict:
    method = get_method(cfg.method.name)
    with timer("load"):
        model, tokenizer = load_model(cfg.model, resolve_device(cfg.device))
    experts_before = moe_layers(model)[0].num_experts
    params_before = count_parameters(model)
    baseline = cached_baseline(model, tokenizer, cfg, timer)

    calib = None
    if getattr(method, "NEEDS_CALIBRATION", True):
        with timer("calibrate"):
            calib = cached_calibration(cfg.calib, tokenizer, cfg.get("cache_dir"))
    stats_path = Path(cfg.cache_dir) / "stats" / f"{stats_key(cfg.model, calib)}.pt" if calib is not None else None
    ctx = Context(model, calib, float(cfg.ratio), OmegaConf.to_container(cfg.method, resolve=True),
                  seed=int(cfg.seed), batch_size=int(cfg.calib.get("batch_size", 8)), progress=bool(cfg.progress),
                  stats_path=stats_path)
    with timer("compress"):
        plan = method.plan(ctx)
        apply_plan(model, plan)
    plan.save(run_dir)
    logger.log_plan(run_dir / "plan.json")

    if cfg.save:  # weights, tokenizer, plan, provenance and legacy keys in config.json, model card
        with timer("save"):
            save_checkpoint(model, tokenizer, run_dir / "checkpoint", cfg, plan, experts_before)
    with timer("evaluate"):
        scores = _evaluate(model, tokenizer, cfg, run_dir / "checkpoint" if cfg.save else None)

    metrics = {
        "status": "done",
        "method": cfg.method.name,
        "ratio": float(cfg.ratio),
        "model": cfg.model.name,
        "mix": list(cfg.calib.mix) if calib is not None and cfg.calib.get("mix") is not None else None,
        "experts_before": experts_before,
        "experts_after": moe_layers(model)[0].num_experts,
        "params_before": params_before,
        "params_after": count_parameters(model),
        "calib_tokens": int(calib["attention_mask"].sum()) if calib is not None else 0,
        "eval": scores,
        "baseline": baseline,
        "timings": timer.seconds,
    }
    if cfg.save:
        write_model_card(run_dir / "checkpoint", scores, baseline)  # now with the scores
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics(metrics)
    rows = {"uncompressed": baseline} if baseline else {}
    rows[f"{cfg.method.name} ({metrics['experts_after']}/{experts_before} experts)"] = scores
    if scores.get("tasks"):
        print(score_table(rows))
    log.info("run finished: %s", run_dir)
    return metrics


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """A failed run leaves its error in its own directory (never over finished results)."""
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))


CONF_DIR = str(PACKAGE_DIR.parent / "conf")  # the repo's conf/ (absolute: works from any working directory)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return run(cfg, run_dir)
    except Exception as exc:
        if not (run_dir / "metrics.json").exists():  # never over finished results
            record_failure(run_dir, exc)
        if hc.mode == RunMode.MULTIRUN:  # one failed run must not sink the sweep
            log.error("run failed (%s): %s; details in %s", type(exc).__name__, exc, run_dir / "error.txt")
            return None
        raise


if __name__ == "__main__":
    main()
