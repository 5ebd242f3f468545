"""The lm-eval call: `evaluate` scores an in-memory model on one eval config.

Backends: the model already in memory is wrapped in lm-eval's HFLM (no reload), so it is evaluated
as model.device_map / max_memory / offload_folder placed it. `backend: vllm` runs the GEN tasks with
lm-eval's vLLM backend instead, which must load the model itself, so it needs the saved
`checkpoint_dir`, split over `tensor_parallel_size` GPUs; MC (loglikelihood) tasks always stay on the
in-memory model.

With `output_dir`, lm-eval's own EvaluationTracker writes its results files there (results_mc_<time>.json,
results_gen_<time>.json: the raw lm-eval output, configs and versions included) and, with
`eval.log_samples=true`, every item's prompt, response and score (samples_<task>_<time>.jsonl). Their
`git_hash` is this code's commit (checkpoint.lm_eval_git_hash). The result's "versions" are the task
(and group) versions lm-eval reports.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..checkpoint import lm_eval_git_hash
from .checks import check_backend, check_tasks
from .code_policy import drop_unsafe
from .entries import Entry, apply_num_fewshot, by_kind, entries_for
from .eval_config import as_dict, bootstrap_iters, for_kind, include_path, mapping
from .scores import summarise, task_protocol, task_score
from .task_index import task_manager

log = logging.getLogger(__name__)


def evaluate(model, tokenizer, cfg, checkpoint_dir: str | os.PathLike | None = None,
             output_dir: str | os.PathLike | None = None) -> dict:
    """Scores `model` on the eval config `cfg`; returns a JSON-serialisable dict.

    {"tasks": {name: {"score", "stderr", "metric", "kind", "n", "fewshot", "metrics", "protocol"}}, "mc",
    "gen", "avg"
    (fractions in [0, 1], None when a side has no task or misses a score), "mc_stderr", "gen_stderr",
    "avg_stderr" (same units), "percent": those six x 100, "mc_tasks", "gen_tasks": the task set of
    each suite, "gen_protocol": {GEN task: its "protocol"},
    "limit", "bootstrap_iters": the eval settings, "skipped": {name: reason}, "versions": {task or
    group: the version lm-eval reports}}.
    `checkpoint_dir` (the saved model) is needed only by backend=vllm; `output_dir` receives lm-eval's
    own results (and per-sample) files.
    """
    cfg = as_dict(cfg)
    names = check_tasks(cfg)
    settings = {"limit": cfg.get("limit"), "bootstrap_iters": bootstrap_iters(cfg)}
    if not names:  # eval=none: lm-eval is not even imported
        return {**summarise({}), **settings, "skipped": {}, "versions": {}}
    if cfg.get("backend") == "vllm" and checkpoint_dir is None:
        raise ValueError("eval.backend=vllm loads the model from disk: pass checkpoint_dir")
    manager = task_manager(include_path(cfg))
    entries = [e for name in names for e in entries_for(manager, name, cfg)]
    entries, skipped = drop_unsafe(entries, bool(cfg.get("allow_code_eval")))
    apply_num_fewshot(entries, cfg.get("num_fewshot"))
    scores, versions = {}, {}
    for kind, group in by_kind(entries).items():
        lm = make_lm(kind, model, tokenizer, cfg, checkpoint_dir)
        tracker = None if output_dir is None else lm_eval_tracker(Path(output_dir), kind)
        raw = run_lm_eval(lm, group, kind, cfg, manager, tracker)
        scores.update({e.name: {**task_score(e, raw), "protocol": task_protocol(e, raw, cfg)} for e in group})
        versions.update(raw.get("versions") or {})
        if tracker is not None:
            save_lm_eval_output(tracker, raw, Path(output_dir), kind)
    return {**summarise(scores), **settings, "skipped": skipped, "versions": dict(sorted(versions.items()))}


# ---------------------------------------------------------------- backends
def _hf_lm(model, tokenizer, cfg: dict, checkpoint_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.get("batch_size") or 1)


def _vllm_lm(model, tokenizer, cfg: dict, checkpoint_dir):
    check_backend("vllm")
    from lm_eval.models.vllm_causallms import VLLM

    extra = mapping(cfg.get("vllm_args"))  # e.g. gpu_memory_utilization, max_model_len
    return VLLM(pretrained=str(checkpoint_dir), batch_size=cfg.get("batch_size") or "auto",
                tensor_parallel_size=int(cfg.get("tensor_parallel_size") or 1), **extra)


LM_BUILDERS = {"hf": _hf_lm, "vllm": _vllm_lm}  # one for each of checks.BACKENDS


def make_lm(kind: str, model, tokenizer, cfg: dict, checkpoint_dir):
    # Only generation gains from vLLM; loglikelihood scoring stays on the in-memory model.
    backend = (cfg.get("backend") or "hf") if kind == "gen" else "hf"
    return LM_BUILDERS[backend](model, tokenizer, cfg, checkpoint_dir)


# ---------------------------------------------------------------- the call and its files
def run_lm_eval(lm, entries: list[Entry], kind: str, cfg: dict, manager, tracker=None) -> dict:
    """lm-eval's simple_evaluate on one suite's entries; its raw output."""
    import lm_eval
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = lm_eval_git_hash  # quiet, and this code's commit
    num_fewshot = cfg.get("num_fewshot")
    max_gen_toks = cfg.get("max_gen_toks")
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[e.obj for e in entries],
        task_manager=manager,
        limit=cfg.get("limit"),
        num_fewshot=num_fewshot if isinstance(num_fewshot, int) else None,
        gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None,
        apply_chat_template=for_kind(cfg.get("apply_chat_template"), kind),
        confirm_run_unsafe_code=bool(cfg.get("allow_code_eval")),
        bootstrap_iters=bootstrap_iters(cfg),
        log_samples=bool(cfg.get("log_samples")),
        evaluation_tracker=tracker,
    )


def lm_eval_tracker(output_dir: Path, kind: str):
    """lm-eval's EvaluationTracker for one suite's files in output_dir (simple_evaluate fills it in)."""
    from lm_eval.loggers import EvaluationTracker

    output_dir.mkdir(parents=True, exist_ok=True)
    return EvaluationTracker(output_path=str(output_dir / f"results_{kind}.json"))


def save_lm_eval_output(tracker, raw: dict, output_dir: Path, kind: str) -> list[Path]:
    """The tracker writes `raw` as output_dir/results_<kind>_<time>.json and, when it holds per-sample
    logs (eval.log_samples), one samples_<task>_<time>.jsonl per task; returns the files written."""
    before = set(output_dir.iterdir())
    raw = dict(raw)  # the tracker adds its own keys; the caller's dict stays as lm-eval returned it
    samples = raw.pop("samples", None)
    tracker.save_results_aggregated(results=raw, samples=samples)
    for task_name in samples or {}:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    written = sorted(set(output_dir.iterdir()) - before)
    if not any(p.name.startswith(f"results_{kind}_") for p in written):  # the tracker only warns
        log.error("lm-eval's EvaluationTracker wrote no results file into %s", output_dir)
    return written
