"""The uncompressed model's scores beside each run's (baseline=true): evaluated once per (model, eval config)
and cached in <cache_dir>/baseline/<key>.json with the record of what made them (docs/caches.md), and the
evaluation's peak GPU memory ("peak_memory_bytes", None on CPU; absent from older entries: docs/bytes.md).

A streamed run never holds the whole uncompressed model, so its baseline must be in the cache already
(check_streamed_baseline, before any load), with the command that fills it (baseline_command).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from .atomic import write_json
from .cache_meta import still_valid
from .config import ConfigError
from .evaluation.harness import evaluate
from .evaluation.scores import scores_made_by
from .footprint import peak_memory, reset_peak_memory
from .identity import baseline_key
from .timing import Timings

log = logging.getLogger("ream_exp")

PEAK = "peak_memory_bytes"  # the baseline evaluation's peak GPU memory, beside the scores in the cache entry
# Overrides a baseline command drops: what it compresses, and how the compressed run places its model.
_NOT_BASELINE = ("method", "ratio", "model.stream", "model.device_map", "hydra.", "logger", "save")


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
        reset_peak_memory()
        scores = evaluate(model, tokenizer, cfg.eval, checkpoint_dir=Path(str(cfg.model.path)).expanduser(),
                          output_dir=path.with_name(path.stem + "_lm_eval"))
    # vLLM allocates in its own process: no peak of this one's to report (docs/bytes.md)
    store_baseline(cfg, scores, made_by, peak_memory() if cfg.eval.get("backend") != "vllm" else None)
    return scores


def store_baseline(cfg: DictConfig, scores: dict, made_by: dict, peak: int | None = None) -> None:
    path = baseline_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {**scores, "made_by": made_by, PEAK: peak})


def baseline_peak_memory(cfg: DictConfig) -> int | None:
    """The peak GPU memory the cached baseline's evaluation took; None when unknown (CPU, vLLM, older entry)."""
    try:
        return json.loads(baseline_path(cfg).read_text()).get(PEAK)
    except (OSError, ValueError, AttributeError):
        return None


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
    scores.pop(PEAK, None)  # a measurement beside the scores (baseline_peak_memory)
    if not still_valid("baseline cache", path, scores.pop("made_by", None), current):
        return None
    tasks = scores.get("tasks")
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and "stderr" in t for t in tasks.values()):
        log.warning("baseline cache %s has no standard errors (older format): evaluating again", path)
        return None
    return scores


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
