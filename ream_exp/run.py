"""One ream-exp run, from a Hydra config to a compressed checkpoint and its scores.

    ream-exp                                   # toy model, default method, ratio 0.25, eval=toy
    ream-exp model=local model.path=DIR method=reap ratio=0.5 eval=none logger=none hydra.run.dir=OUT

The run directory gets config.yaml (resolved), plan.json, metrics.json, checkpoint/ (unless save=false) and
lm_eval/ (lm-eval's own results files, per-sample outputs with eval.log_samples=true; see ream_exp.evaluation).
Tests call `run(cfg)` directly; `hydra_main` is the Hydra task and `main` the console script, which prints
errors raised on purpose (ConfigError, Hydra's config composition errors) as one `error: ...` line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR as _CONF_DIR
from .calib import calibration_datasets, recorded_mix, validate_calib
from .cache_meta import still_valid
from .calib.cache import cache_path, cached_calibration, calibration_key
from .checkpoint import save_checkpoint, write_model_card
from .config import (ConfigError, check_cache_dir, check_expert_counts, check_model_path, check_placement, check_ratio,
                     check_seed)
from .dataset_check import check_datasets
from .evaluation.checks import check_tasks
from .evaluation.data_needs import check_runtime_data, task_datasets
from .evaluation.harness import evaluate
from .evaluation.scores import scores_made_by
from .methods import Context, get_method
from .methods.states import StatesConfig
from .moe import apply_plan, moe_layers
from .identity import baseline_key, config_digest, digest, run_identity, stats_key
from .atomic import write_json
from .loading import load_model, load_model_config, load_tokenizer
from .placement import offload_scratch, resolve_device
from .report import report
from .stream import PARTIAL, LayerStream, check_stream, resumable
from .timing import Timings
from .settings import check_settings, composition_refusal
from .tracking import check_logger, make_logger
from .rundir import RunDirRefusal, RunDirTaken, hold_run_dir, hydra_job_files, set_aside
from .weight_files import check_weight_files

log = logging.getLogger("ream_exp")

RESULT_FILES = ("metrics.json", "plan.json", "plan_perms.pt", "checkpoint", "lm_eval", "error.txt")
IDENTITY_FILE = "identity.json"
IDENTITY_KEY = "identity"  # the same in the logger's run config, as JSON text (analysis.settings reads it)  # run_identity at the run's start: what a relaunch must match to skip it


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
    unfinished attempt (a crash, a kill, a damaged metrics.json) are moved to attempts/<time>-<unique>/, not
    deleted, and the run starts over; only a streamed run's finished layers (checkpoint.partial/ of this
    very config, model.stream=true) stay, for the relaunch to continue from them.
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


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def validate(cfg: DictConfig):
    """Every check that can fail before a model is loaded. Returns the model's transformers config.

    Cheap local checks first (settings, cache_dir, config.json, pre-tokenised ids, weight-file headers),
    then the hub datasets the run reads and the nltk data its eval tasks need; each failure is a
    ConfigError naming the setting.
    """
    check_settings(cfg)  # every key known, every value of its type (ream_exp/settings.py)
    ratio = check_ratio(cfg.ratio)
    check_seed(cfg.seed)
    check_logger(cfg.get("logger"))
    method = get_method(cfg.method.name)
    needs_calibration = getattr(method, "NEEDS_CALIBRATION", True)
    check_tasks(cfg.eval)
    check_cache_dir(cfg.get("cache_dir"))
    check_model_path(cfg.model)
    check_placement(cfg.model)
    model_config = _model_config(cfg.model)
    num_experts, n_keep = check_expert_counts(model_config, ratio)
    check_stream(cfg, model_config)
    check_streamed_baseline(cfg)
    if hasattr(method, "check"):  # method-specific settings, e.g. REAM's group size against N and N'
        method.check(OmegaConf.to_container(cfg.method, resolve=True), num_experts, n_keep)
    if needs_calibration:
        validate_calib(cfg.calib, getattr(model_config.get_text_config(), "vocab_size", None))
    check_weight_files(cfg.model)
    check_datasets(_datasets_needed(cfg, needs_calibration))
    check_runtime_data(cfg.eval)  # nltk data ifeval would download mid-run (README: evaluation)
    return model_config


def _model_config(model_cfg: DictConfig):
    try:
        return load_model_config(model_cfg)
    except (OSError, ValueError) as exc:  # no config.json there, unreachable hub id, unknown model_type
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path={str(model_cfg.path)!r}: its config.json cannot be read ({reason})") from exc


def _datasets_needed(cfg: DictConfig, needs_calibration: bool) -> list:
    """The hub datasets the run reads: its eval tasks', and its calibration sources' unless already tokenised."""
    needed = task_datasets(cfg.eval)
    if needs_calibration:
        sources = list(calibration_datasets(cfg.calib).items())
        if sources and not _calibration_cached(cfg):
            needed += sources
    return needed


def _calibration_cached(cfg: DictConfig) -> bool:
    """Whether this calibration set is in the cache already (then its sources are never read)."""
    if not cfg.get("cache_dir") or not any((Path(cfg.cache_dir) / "calib").glob("*.pt")):
        return False  # nothing cached: no need to load the tokenizer to compute the key
    try:
        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError):  # no tokenizer here yet: the sources will have to be read
        return False
    return cache_path(cfg.cache_dir, calibration_key(cfg.calib, tokenizer)).exists()


def _evaluate(model, tokenizer, cfg, checkpoint_dir: Path | None = None, output_dir: Path | None = None) -> dict:
    return evaluate(model, tokenizer, cfg.eval, checkpoint_dir=checkpoint_dir, output_dir=output_dir)


def _usable_baseline(path: Path, current: dict) -> dict | None:
    """A cached baseline's scores, or None (evaluate again) when it is unreadable, was made by other code,
    lm-eval or task versions than `current` says (or does not say: cache_meta), or was written before
    per-task standard errors were recorded."""
    try:
        scores = json.loads(path.read_text())
    except (OSError, ValueError):  # cut short or damaged
        log.warning("unreadable baseline cache %s: evaluating the uncompressed model again", path)
        return None
    if not isinstance(scores, dict):
        log.warning("baseline cache %s holds no scores: evaluating the uncompressed model again", path)
        return None
    if not still_valid("baseline cache", path, scores.pop("made_by", None), current):
        return None
    tasks = scores.get("tasks")
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and "stderr" in t for t in tasks.values()):
        log.warning("baseline cache %s has no standard errors (older format): evaluating again", path)
        return None
    return scores


def scores_wanted(cfg: DictConfig) -> bool:
    return bool(list(cfg.eval.get("tasks") or []))


def baseline_wanted(cfg: DictConfig) -> bool:
    """Whether the run reports the uncompressed model's scores beside its own (method=none is that model)."""
    return bool(cfg.get("baseline")) and scores_wanted(cfg) and cfg.method.name != "none"


def baseline_path(cfg: DictConfig) -> Path:
    """Where the uncompressed model's scores under this eval are cached (one file per model and eval)."""
    return Path(cfg.cache_dir) / "baseline" / f"{baseline_key(cfg.model, cfg.eval)}.json"


def cached_baseline(model, tokenizer, cfg: DictConfig, timer: Timings) -> dict | None:
    """Scores of the uncompressed model, evaluated once per (model, eval config) and cached on disk."""
    if not baseline_wanted(cfg):
        return None
    path = baseline_path(cfg)
    made_by = scores_made_by(cfg.eval)  # recorded in the entry: scores made otherwise are evaluated again
    cached = _usable_baseline(path, made_by) if path.exists() else None
    if cached is not None:
        return cached
    with timer("baseline_eval"):  # eval.backend=vllm loads the uncompressed model from model.path itself
        scores = _evaluate(model, tokenizer, cfg, checkpoint_dir=Path(str(cfg.model.path)).expanduser(),
                           output_dir=path.with_name(path.stem + "_lm_eval"))
    store_baseline(cfg, scores, made_by)
    return scores


def store_baseline(cfg: DictConfig, scores: dict, made_by: dict) -> None:
    path = baseline_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**scores, "made_by": made_by})


def check_streamed_baseline(cfg: DictConfig) -> None:
    """A streamed run never holds the whole uncompressed model, so its baseline (with the hf backend) must
    be in the cache already: else refused before any load, with the command that evaluates it on its own."""
    if not cfg.model.get("stream") or not baseline_wanted(cfg) or cfg.eval.get("backend") == "vllm":
        return
    path = baseline_path(cfg)
    if path.exists() and _usable_baseline(path, scores_made_by(cfg.eval)) is not None:
        return
    raise ConfigError("model.stream=true never holds the whole model in memory, so it cannot evaluate the "
                      "uncompressed model for baseline=true, and its scores under this eval are not cached in "
                      f"{path.parent}: evaluate it once with `{baseline_command(cfg)}` (a device map that fits), "
                      "or set baseline=false, or eval.backend=vllm")


# Overrides a baseline command drops: what it compresses, and how the compressed run places its model.
_NOT_BASELINE = ("method", "ratio", "model.stream", "model.device_map", "hydra.", "logger", "save")


def baseline_command(cfg: DictConfig) -> str:
    """The command line that evaluates this run's uncompressed model under its eval and fills its cache."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        given = [o for o in HydraConfig.get().overrides.task
                 if not o.lstrip("+~").startswith(_NOT_BASELINE)]
    else:
        given = [f"model={cfg.model.name}", f"model.path={cfg.model.path}", f"eval={cfg.eval.name}",
                 f"cache_dir={cfg.cache_dir}"]
    return " ".join(["ream-exp", *given, "method=none", "model.stream=false", "model.device_map=auto"])


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Load -> calibrate -> compress -> save -> evaluate; returns (and writes) metrics.json's content.

    The run directory is held from before validation until metrics.json is written: a second process into
    it (another config, or this one relaunched while it runs) is refused at once with RunDirBusy. A run
    that fails leaves error.txt while it still holds the directory, so no other process can step in between.
    """
    run_dir = Path(run_dir or cfg.get("run_dir") or "outputs/run")
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_dir(run_dir):
        done = finished_run(run_dir, cfg)
        if done is not None:
            log.info("already finished with this config, skipped: %s", run_dir)
            print(f"skipped (already finished with the same config): {run_dir}")
            return done
        with hydra_job_files(run_dir, cfg):  # only a run that computes writes Hydra's files and log
            try:
                return _run_fresh(cfg, run_dir)
            except Exception as exc:
                record_failure(run_dir, exc)
                raise


def _run_fresh(cfg: DictConfig, run_dir: Path) -> dict:
    validate(cfg)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    identity = write_identity(run_dir, cfg)
    torch.manual_seed(int(cfg.seed))
    # the identity as JSON text: W&B splits nested keys at dots (weights file names have them)
    logger = make_logger(cfg.logger, run_dir, {**OmegaConf.to_container(cfg, resolve=True),
                                               IDENTITY_KEY: json.dumps(identity, sort_keys=True)})
    timer = Timings()
    try:
        with offload_scratch(cfg.model, run_dir) as offload_folder:  # removed when the run ends
            metrics = _run_stages(cfg, run_dir, timer, logger, offload_folder)
    finally:
        logger.finish()
    report(metrics, run_dir)
    return metrics


def _run_stages(cfg: DictConfig, run_dir: Path, timer: Timings, logger, offload_folder: Path | None = None) -> dict:
    method = get_method(cfg.method.name)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    calib = None
    if getattr(method, "NEEDS_CALIBRATION", True):  # the tokenizer alone: a bad source fails before the load
        with timer("calibrate"):
            calib = cached_calibration(cfg.calib, tokenizer, cfg.get("cache_dir"))
    stream = None
    with timer("load"):
        if cfg.model.get("stream"):  # a meta skeleton; decoder layers are loaded one at a time
            stream = LayerStream.open(cfg.model, device, run_dir, config_digest(cfg))
            model = stream.model
        else:
            model, tokenizer = load_model(cfg.model, device, offload_folder)
    experts_before = moe_layers(model)[0].num_experts
    params_before = count_parameters(model)
    # a streamed run's baseline is cached (check_streamed_baseline) or evaluated by vLLM from model.path
    baseline = cached_baseline(model if stream is None else None, tokenizer, cfg, timer)
    stats_path = Path(cfg.cache_dir) / "stats" / f"{stats_key(cfg.model, calib)}.pt" if calib is not None else None
    ctx = Context(model, calib, float(cfg.ratio), OmegaConf.to_container(cfg.method, resolve=True),
                  seed=int(cfg.seed), batch_size=int(cfg.calib.get("batch_size", 8)), progress=bool(cfg.progress),
                  stats_path=stats_path, states=StatesConfig.from_calib(cfg.calib, cfg.get("cache_dir")),
                  stream=stream)
    with timer("compress"):
        plan = method.plan(ctx)
        if stream is not None:  # layers a method did not go through are written now, as planned
            stream.complete(plan.layers)
        apply_plan(model, plan)
    plan.save(run_dir)
    logger.log_plan(run_dir / "plan.json")

    if cfg.save:  # weights, tokenizer, plan, provenance and legacy keys in config.json, model card
        with timer("save"):
            if stream is not None:
                stream.save(tokenizer, run_dir / "checkpoint", cfg, plan, experts_before, calib is not None)
            else:
                save_checkpoint(model, tokenizer, run_dir / "checkpoint", cfg, plan, experts_before,
                                calib is not None)
    params_after = count_parameters(model)
    if stream is not None and list(cfg.eval.get("tasks") or []):  # the compressed model is on disk only
        model = load_model(OmegaConf.merge(cfg.model, {"path": str(run_dir / "checkpoint"), "dtype": "auto"}),
                           device)[0]
    with timer("evaluate"):
        scores = _evaluate(model, tokenizer, cfg, run_dir / "checkpoint" if cfg.save else None,
                           output_dir=run_dir / "lm_eval" if scores_wanted(cfg) else None)

    metrics = {
        "status": "done",
        "method": cfg.method.name,
        "ratio": float(cfg.ratio),
        "model": cfg.model.name,
        "mix": recorded_mix(cfg.calib) if calib is not None else None,  # {source: weight}
        "experts_before": experts_before,
        "experts_after": moe_layers(model)[0].num_experts,
        "params_before": params_before,
        "params_after": params_after,
        "calib_tokens": int(calib["attention_mask"].sum()) if calib is not None else 0,
        "eval": scores,
        "baseline": baseline,
        "timings": dict(timer),
    }
    if cfg.method.name == "none" and scores_wanted(cfg):  # the uncompressed model's: every later baseline
        store_baseline(cfg, scores, scores_made_by(cfg.eval))
    if cfg.save:
        write_model_card(run_dir / "checkpoint", scores, baseline)  # now with the scores
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics(metrics)
    logger.log_results(run_dir / "metrics.json")
    return metrics


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """A failed run leaves its error in its own directory (never over finished results)."""
    if isinstance(exc, RunDirRefusal) or (run_dir / "metrics.json").exists():  # not this run's directory
        return
    (run_dir / "error.txt").write_text("".join(traceback.format_exception(exc)))


CONF_DIR = str(_CONF_DIR)  # conf/, of the checkout or the installed package (absolute: any working directory)


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


# Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1); main() records it before it sets the
# variable itself, None when the task function runs without main().
_user_wants_traces: bool | None = None


def _full_error_wanted() -> bool:
    if _user_wants_traces is not None:
        return _user_wants_traces
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return run(cfg, run_dir)
    except Exception as exc:  # run() has written error.txt, unless the directory refused the run
        if hc.mode == RunMode.MULTIRUN:  # one failed run must not sink the sweep
            details = "" if isinstance(exc, RunDirRefusal) else f"; details in {run_dir / 'error.txt'}"
            log.error("run failed (%s): %s%s", type(exc).__name__, _one_line(exc), details)
            return None
        if isinstance(exc, ConfigError) and not _full_error_wanted():
            # SystemExit passes Hydra's job runner (it catches Exception), so nothing else is printed.
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            sys.exit(1)
        raise


def _hydra_error_line(exc) -> str:
    """One line for a Hydra error: the missing option with the valid ones, or the override that did not parse."""
    refusal = composition_refusal(exc)  # `metod=reap`: not a setting at all (Hydra would suggest +metod=reap)
    if refusal:
        return refusal
    options = getattr(exc, "options", None)  # MissingConfigException: the group's valid options
    if options:
        return f"{str(exc).splitlines()[0]}; available: {', '.join(options)}"
    override = getattr(exc, "override", None)  # OverrideParseException
    return f"cannot parse override {override!r}: {_one_line(exc)}" if override else _one_line(exc)


def main() -> None:
    """The `ream-exp` console script: Hydra's entry point, with errors raised on purpose as one line.

    Hydra prints its own errors (an unknown group option like method=foo, a bad override) over several
    lines unless HYDRA_FULL_ERROR=1, which makes it re-raise them; so it is set here, and those errors
    become `error: ...` too. Every other exception keeps its full traceback.
    """
    global _user_wants_traces
    from hydra.errors import CompactHydraException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    _user_wants_traces = previous == "1"
    if _user_wants_traces:  # Hydra's own behaviour, untouched
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except CompactHydraException as exc:  # config composition: unknown option, bad override syntax
        print(f"error: {_hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except ConfigError as exc:  # raised by a sweeper before any run (hydra/sweeper=mix_search)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
