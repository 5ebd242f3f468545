"""One ream-exp run, from a Hydra config to a compressed checkpoint and its scores, as one straight line of
stages.

    from ream_exp.run import run
    metrics = run(cfg, run_dir)           # what `ream-exp ...` runs (ream_exp.cli); tests call it directly

hold the run directory (rundir) -> skip a finished run, set an unfinished attempt aside (run_records) ->
validate (every check that can fail before a model loads) -> config.yaml, identity.json -> calibrate (the
tokenizer alone) -> load -> the uncompressed model's scores (baseline) -> compress -> save -> evaluate ->
metrics.json -> report.

The run directory gets config.yaml (resolved), identity.json, plan.json, metrics.json, checkpoint/ (unless
save=false) and lm_eval/ (lm-eval's own results files, per-sample outputs with eval.log_samples=true; see
ream_exp.evaluation.harness).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import write_json
from .baseline import baseline_peak_memory, cached_baseline, check_streamed_baseline, scores_wanted, store_baseline
from .calib import calibration_datasets, recorded_mix, validate_calib
from .calib.cache import cached_calibration, is_cached
from .checkpoint import save_checkpoint, write_model_card
from .config import ConfigError, check_cache_dir, check_expert_counts, check_model_path, check_placement
from .dataset_check import check_datasets
from .evaluation.checks import check_tasks
from .evaluation.data_needs import check_runtime_data, task_datasets
from .evaluation.harness import evaluate
from .evaluation.scores import scores_made_by
from .footprint import (checkpoint_footprint, model_footprint, original_footprint, peak_memory, reset_peak_memory,
                        without_tied_copies)
from .identity import config_digest, stats_key
from .loading import load_model, load_model_config, load_tokenizer
from .methods import Context, get_method, reads_calibration
from .methods.budget import allot, budget_info, check_budget
from .methods.layer_stream import LayerStream
from .methods.states import StatesConfig
from .moe import apply_plan, moe_layers
from .moe.offload import execution_device
from .mtp_layers import MTPLayers, check_mtp
from .placement import offload_scratch, resolve_device
from .quant import check_quant, needs_calibration as quant_needs_calibration, quant_name
from .quant.stage import quantize_checkpoint
from .report import report
from .run_records import IDENTITY_KEY, finished_run, record_failure, write_identity
from .rundir import hold_run_dir, hydra_job_files
from .settings import check_settings
from .stream_source import check_stream
from .timing import Timings
from .tracking import make_logger
from .weight_files import check_weight_files

log = logging.getLogger("ream_exp")


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
    tokenizer = functools.cache(functools.partial(load_tokenizer, cfg.model))  # loaded once, when first needed
    validate(cfg, tokenizer)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    identity = write_identity(run_dir, cfg)
    torch.manual_seed(int(cfg.seed))
    # the identity as JSON text: W&B splits nested keys at dots (weights file names have them)
    logger = make_logger(cfg.logger, run_dir, {**OmegaConf.to_container(cfg, resolve=True),
                                               IDENTITY_KEY: json.dumps(identity, sort_keys=True)})
    timer = Timings()
    try:
        with offload_scratch(cfg.model, run_dir) as offload_folder:  # removed when the run ends
            metrics = _run_stages(cfg, run_dir, timer, logger, tokenizer(), offload_folder)
    except BaseException:  # an error, or Ctrl-C: the W&B run is marked failed
        logger.finish(exit_code=1)
        raise
    logger.finish()
    report(metrics, run_dir)
    return metrics


# ---------------------------------------------------------------- validate: before any load
def validate(cfg: DictConfig, tokenizer: Callable[[], Any] | None = None):
    """Every check that can fail before a model is loaded. Returns the model's transformers config.

    `tokenizer` returns the run's tokenizer (keys the calibration cache; called only when a set is cached),
    by default model.path's, loaded here.

    Cheap local checks first (settings, cache_dir, config.json, pre-tokenised ids, weight-file headers),
    then the hub datasets the run reads and the nltk data its eval tasks need; each failure is a
    ConfigError naming the setting.
    """
    check_settings(cfg)  # every key known, every value of its type, the checks of several (ream_exp/settings.py)
    tokenizer = tokenizer or functools.partial(load_tokenizer, cfg.model)
    ratio = float(cfg.ratio)
    method = get_method(cfg.method.name)
    needs_calibration = reads_calibration(method, OmegaConf.to_container(cfg.method, resolve=True)) \
        or quant_needs_calibration(cfg)
    check_budget(cfg)  # budget=global: the method and settings it needs (the router's groups once config.json is read)
    check_tasks(cfg.eval)
    check_cache_dir(cfg.get("cache_dir"))
    check_model_path(cfg.model)
    check_placement(cfg.model)
    model_config = _model_config(cfg.model)
    num_experts, n_keep = check_expert_counts(model_config, ratio)
    check_stream(cfg, model_config)
    check_budget(cfg, model_config)
    check_streamed_baseline(cfg)
    check_quant(cfg, model_config)  # save=true, the quantization environment, the group size
    if hasattr(method, "check"):  # method-specific settings, e.g. REAM's group size against N and N'
        method.check(OmegaConf.to_container(cfg.method, resolve=True), num_experts, n_keep)
    if needs_calibration:
        validate_calib(cfg.calib, getattr(model_config.get_text_config(), "vocab_size", None))
    check_weight_files(cfg.model)
    # multi-token-prediction tensors it cannot compress, or beside a per-layer budget
    check_mtp(cfg.model, model_config, num_experts, n_keep, budget=cfg.get("budget", "uniform"), quant=quant_name(cfg))
    check_datasets(_datasets_needed(cfg, needs_calibration, tokenizer))
    check_runtime_data(cfg.eval)  # nltk data ifeval would download mid-run (docs/evaluation.md)
    return model_config


def _model_config(model_cfg: DictConfig):
    try:
        return load_model_config(model_cfg)
    except (OSError, ValueError) as exc:  # no config.json there, unreachable hub id, unknown model_type
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.path={str(model_cfg.path)!r}: its config.json cannot be read ({reason})") from exc


def _datasets_needed(cfg: DictConfig, needs_calibration: bool, tokenizer: Callable[[], Any]) -> list:
    """The hub datasets the run reads: its eval tasks', and its calibration sources' unless already tokenised."""
    needed = task_datasets(cfg.eval)
    if needs_calibration:
        sources = list(calibration_datasets(cfg.calib).items())
        if sources and not _calibration_cached(cfg, tokenizer):
            needed += sources
    return needed


def _calibration_cached(cfg: DictConfig, tokenizer: Callable[[], Any]) -> bool:
    """Whether this calibration set will be read from the cache (then its sources are never read): there,
    sound and made by this code and tokenizer, as the calibration cache itself checks it (calib.cache)."""
    if not cfg.get("cache_dir") or not any((Path(cfg.cache_dir) / "calib").glob("*.pt")):
        return False  # nothing cached: no need to load the tokenizer to compute the key
    try:
        loaded = tokenizer()
    except (OSError, ValueError):  # no tokenizer here yet: the sources will have to be read
        return False
    return is_cached(cfg.calib, loaded, cfg.cache_dir)


# ---------------------------------------------------------------- the stages
def _run_stages(cfg: DictConfig, run_dir: Path, timer: Timings, logger, tokenizer,
                offload_folder: Path | None = None) -> dict:
    """The stages after validation, in order, with the run's one tokenizer; returns metrics.json's content."""
    method = get_method(cfg.method.name)
    device = resolve_device(cfg.device)
    calib = _calibrate(cfg, method, tokenizer, timer)
    stream = None
    with timer("load"):
        if cfg.model.get("stream"):  # a meta skeleton; decoder layers are loaded one at a time
            stream = LayerStream.open(cfg.model, device, run_dir, config_digest(cfg))
            model = stream.model
        else:
            model = load_model(cfg.model, device, offload_folder)
        mtp = _open_mtp(cfg, model, stream)
    experts_before, params_before = moe_layers(model)[0].num_experts, count_parameters(model)
    weights_before = original_footprint(model, cfg.model)  # docs/bytes.md
    # a streamed run's baseline is cached (check_streamed_baseline) or evaluated by vLLM from model.path
    baseline = cached_baseline(model if stream is None else None, tokenizer, cfg, timer)
    if baseline is not None:
        baseline = {**baseline, "weights": weights_before, "peak_memory_bytes": baseline_peak_memory(cfg)}
    plan = _compress(cfg, method, model, calib, stream, mtp, timer)
    plan.save(run_dir)
    logger.log_plan(run_dir / "plan.json")
    if cfg.save:  # weights, tokenizer, plan, provenance and legacy keys in config.json, model card
        with timer("save"):
            if stream is not None:
                stream.save(tokenizer, run_dir / "checkpoint", cfg, plan, experts_before, calib is not None)
            else:
                save_checkpoint(model, tokenizer, run_dir / "checkpoint", cfg, plan, experts_before,
                                calib is not None)
            if mtp is not None:  # the MTP layer, compressed as planned, as one more shard
                mtp.write(model, run_dir / "checkpoint")
    params_after = count_parameters(model)
    # the checkpoint as written (measured on its files), else the model as it would be written
    weights = checkpoint_footprint(run_dir / "checkpoint", model) if cfg.save else model_footprint(model)
    quant = {"name": "none"}
    settings = check_quant(cfg, model.config)
    if settings:  # the saved checkpoint is quantized in another process, then evaluated as saved
        model = stream = None
        _release_memory()
        with timer("quantize"):
            quant = quantize_checkpoint(run_dir, settings, OmegaConf.to_container(cfg.quant, resolve=True), calib,
                                        _vocab_size(cfg.model))
    if settings or (stream is not None and scores_wanted(cfg)):  # the model to evaluate is on disk only
        model = load_model(OmegaConf.merge(cfg.model, {"path": str(run_dir / "checkpoint"), "dtype": "auto"}),
                           device)
    if settings:
        quant = reload_check(model, quant)
        # bytes measured on the quantized files; parameters as counted before (the files pack them)
        measured = checkpoint_footprint(run_dir / "checkpoint", model)
        weights = {**weights, **{key: measured[key] for key in ("bytes", "expert_bytes", "measured")}}
    with timer("evaluate"):
        scores, peak = evaluate_with_peak(model, tokenizer, cfg, run_dir)
    metrics = {
        "status": "done",
        "method": cfg.method.name,
        "ratio": float(cfg.ratio),
        "model": cfg.model.name,
        "mix": recorded_mix(cfg.calib) if calib is not None else None,  # {source: weight}
        "experts_before": experts_before,
        "experts_after": experts_after(model),
        "params_before": params_before,
        "params_after": params_after,
        "weights_before": weights_before,
        "weights": weights,
        "peak_memory_bytes": peak,
        "calib_tokens": int(calib["attention_mask"].sum()) if calib is not None else 0,
        "quant": quant,
        "eval": scores,
        "baseline": baseline,
        "timings": dict(timer),
    }
    if cfg.get("budget", "uniform") != "uniform":  # N'_l per MoE layer (their mean is experts_after)
        metrics["budget"] = cfg.budget
        metrics["layer_experts"] = {str(layer.index): layer.num_experts for layer in moe_layers(model)}
    _record(cfg, run_dir, metrics, logger)
    return metrics


def _calibrate(cfg: DictConfig, method, tokenizer, timer: Timings) -> dict | None:
    """The calibration tokens, with the tokenizer alone (a bad source fails before the load); None for a
    method and a quant stage that read none."""
    if not reads_calibration(method, OmegaConf.to_container(cfg.method, resolve=True)) \
            and not quant_needs_calibration(cfg):
        return None
    with timer("calibrate"):
        return cached_calibration(cfg.calib, tokenizer, cfg.get("cache_dir"))


def _open_mtp(cfg: DictConfig, model, stream: LayerStream | None) -> MTPLayers | None:
    """The checkpoint's multi-token-prediction layer (None without one), built beside the model
    (mtp_layers.py); its weights are read when first needed."""
    if stream is not None:
        mtp = MTPLayers.open(cfg.model, model, stream.device, stream.dtype)
    else:
        mtp = MTPLayers.open(cfg.model, model, execution_device(model.get_input_embeddings()), model.dtype)
    if mtp is not None:  # a hub checkpoint's tensors are read only now: the check of validate, again
        check_mtp(cfg.model, model.config, *check_expert_counts(model.config, float(cfg.ratio)), found=mtp.found,
                  budget=cfg.get("budget", "uniform"), quant=quant_name(cfg))
    return mtp


def _compress(cfg: DictConfig, method, model, calib: dict | None, stream: LayerStream | None,
              mtp: MTPLayers | None, timer: Timings):
    """The method's plan, applied to the model (and its MTP layer, the plan's last MoE layer); returns the plan."""
    stats_path = Path(cfg.cache_dir) / "stats" / f"{stats_key(cfg.model, calib)}.pt" if calib is not None else None
    ctx = Context(model, calib, float(cfg.ratio), OmegaConf.to_container(cfg.method, resolve=True),
                  seed=int(cfg.seed), batch_size=int(cfg.calib.get("batch_size", 8)), progress=bool(cfg.progress),
                  stats_path=stats_path, states=StatesConfig.from_calib(cfg.calib, cfg.get("cache_dir")),
                  stream=stream, mtp=mtp)
    with timer("compress"):
        if cfg.get("budget", "uniform") == "global":  # N'_l per layer, from the uncompressed model's scores
            ctx.keep_counts = allot(ctx)
        plan = method.plan(ctx)
        if ctx.keep_counts is not None:
            plan.info.update(budget_info(ctx, ctx.keep_counts))
        if stream is not None:  # layers a method did not go through are written now, as planned
            stream.complete(plan.layers)
        if mtp is not None:
            mtp.load(model)
        apply_plan(model, plan, mtp.layers if mtp is not None else [])
    return plan


def _record(cfg: DictConfig, run_dir: Path, metrics: dict, logger) -> None:
    """metrics.json (and the logger's copy), the model card's scores, and the uncompressed model's scores
    as every later run's baseline when this run is that model (method=none)."""
    scores, baseline = metrics["eval"], metrics["baseline"]
    if cfg.method.name == "none" and scores_wanted(cfg):  # the uncompressed model's: every later baseline
        store_baseline(cfg, scores, scores_made_by(cfg.eval), metrics["peak_memory_bytes"])
    if cfg.save:
        write_model_card(run_dir / "checkpoint", scores, baseline)  # now with the scores
    write_json(run_dir / "metrics.json", metrics)
    logger.log_metrics(metrics)
    logger.log_results(run_dir / "metrics.json")


def evaluate_with_peak(model, tokenizer, cfg: DictConfig, run_dir: Path) -> tuple[dict, int | None]:
    """The scores, and the evaluation's peak GPU memory (torch.cuda.max_memory_allocated; None on CPU, with
    no task, and with eval.backend=vllm, whose engine allocates in its own process: docs/bytes.md)."""
    reset_peak_memory()
    scores = evaluate(model, tokenizer, cfg.eval, checkpoint_dir=run_dir / "checkpoint" if cfg.save else None,
                      output_dir=run_dir / "lm_eval" if scores_wanted(cfg) else None)
    measured = scores_wanted(cfg) and cfg.eval.get("backend") != "vllm"
    return scores, peak_memory() if measured else None


def experts_after(model) -> int | float:
    """Routed experts per MoE layer: the one count, or (per-layer budgets) the mean count, an integer when
    the layers started alike, since budget=global removes as many experts in all as the ratio does."""
    counts = [layer.num_experts for layer in moe_layers(model)]
    mean = sum(counts) / len(counts)
    return int(mean) if mean == int(mean) else mean


def _release_memory() -> None:
    """Frees what the dropped model held, before the quantization process loads the checkpoint."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vocab_size(model_cfg: DictConfig) -> int:
    return int(getattr(load_model_config(model_cfg).get_text_config(), "vocab_size", 2) or 2)


def reload_check(model, quant: dict) -> dict:
    """The quantization entry for metrics.json: the probe's logits of the checkpoint as transformers loaded
    it here against those of the model llm-compressor quantized (equal to float32 rounding for weight-only
    schemes; FP8 and INT8 activations are not quantized by a transformers reload of fused experts)."""
    batch, reference = quant.pop("probe"), quant.pop("probe_logits")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return {**quant, "reload_max_abs_diff": float((logits - reference).abs().max()),
            "probe_logits_max_abs": float(reference.abs().max())}


def count_parameters(model) -> int:
    """Every parameter once: tied weights once, even as two tensors of a streamed run's skeleton."""
    return sum(p.numel() for p in without_tied_copies(model, dict(model.named_parameters())).values())


if __name__ == "__main__":  # the entry point moved to ream_exp.cli; say so rather than exit silently
    raise SystemExit("ream_exp.run is not a command: run `ream-exp ...` or `python -m ream_exp.cli ...`")
