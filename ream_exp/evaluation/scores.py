"""From lm-eval's raw output to scores: each task's score, standard error and protocol, the suites'
means and standard errors, and the record of what made a set of scores.

Each task's entry keeps its primary metric's score (entries: metric choice) and every metric lm-eval
reports for the task ("metrics"). MC = mean of the MC task scores, GEN = mean of the GEN ones, AVG =
(MC + GEN) / 2 (docs/evaluation.md).

GEN protocol: each task's entry records how it was run ("protocol": the prompt variant, its version,
the shots, metric, filter, chat template, stop sequences and token cap), and "gen_protocol" gathers the
GEN tasks' protocols, so that analysis refuses to compare GEN means run under different protocols.
Each suite's task set is recorded ("mc_tasks", "gen_tasks": the tasks it was meant to score), so
means over different task sets are never compared unknowingly; a task of the set whose metric is
missing makes that suite's mean (and AVG) None, with an error logged, never a mean over fewer tasks.

Standard errors: each task's `stderr` is the one lm-eval reports beside its metric ("acc_stderr,none"),
in the same units as its score. lm-eval computes it in closed form for metrics aggregated by `mean`
(sample standard deviation / sqrt(n): every task of this project) and by bootstrap, with
`eval.bootstrap_iters` resamples, for the few others (median, f1, mcc, bleu, ...); bootstrap_iters=0
turns every stderr off (None). A group's stderr is lm-eval's pooled one. The suites' means are means
of k task scores over disjoint item sets, so, taking the tasks as independent,
SE(MC) = sqrt(sum_i SE_i^2) / k, the same for GEN, and SE(AVG) = sqrt(SE(MC)^2 + SE(GEN)^2) / 2 (AVG's
own suite's SE when only one suite has tasks); a task without a stderr makes its suite's SE None.
They measure the sampling error of the eval items only, not run-to-run variation of the compression.

What made a set of scores (`scores_made_by`, recorded in the uncompressed model's cached scores, see
cache_meta): EVAL_VERSION below, lm-eval's version and the version each task's YAML declares
(`metadata.version`, the one lm-eval reports), read from lm-eval's task index before anything runs.
"""

from __future__ import annotations

import importlib.metadata
import logging

from ..cache_meta import made_by
from .entries import Entry
from .eval_config import for_kind, mapping
from .task_index import task_versions

log = logging.getLogger(__name__)

# The version of the code that turns lm-eval's output into scores (metric choice in entries.py, means,
# standard errors here), recorded in the cached scores of the uncompressed model: bump it when a change
# there changes a score (docs/caches.md).
EVAL_VERSION = 2  # 2: every reported metric and the task's protocol recorded per task

SUITES = ("mc", "gen")


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def scores_made_by(cfg) -> dict:
    """What makes this eval config's scores now (cache_meta.made_by): EVAL_VERSION, lm-eval's version and
    each task's declared version ("task <name>")."""
    return made_by({"evaluate": EVAL_VERSION}, **{"lm-eval": lm_eval_version()},
                   **{f"task {name}": version for name, version in task_versions(cfg).items()})


# ---------------------------------------------------------------- one task
def task_score(entry: Entry, raw: dict) -> dict:
    """One task's result from lm-eval's raw output: score, stderr, metric, kind, n, fewshot, metrics."""
    reported = raw["results"].get(entry.name, {})
    value = reported.get(entry.metric)
    n = sum(int(raw["n-samples"][t.task_name]["effective"]) for t in entry.leaves)
    if not isinstance(value, (int, float)):
        available = sorted(k for k in reported if "," in k and "_stderr" not in k)
        log.error("%s reports no %r (has %s): its suite's mean will be None", entry.name, entry.metric,
                  available)
        value = None
    every = {key: float(v) for key, v in sorted(reported.items())
             if "," in key and "_stderr" not in key and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"score": None if value is None else float(value), "stderr": _stderr(entry, reported),
            "metric": entry.metric, "kind": entry.kind, "n": n, "fewshot": _fewshot(entry, raw),
            "metrics": every}


def task_protocol(entry: Entry, raw: dict, cfg: dict) -> dict:
    """How a task was run (docs/algorithms.md, "GEN protocol"): the prompt variant (the task YAML's
    metadata.variant, else lm-eval's task of that name) and its version, shots, metric, filter, chat
    template, stop sequences and generation cap (None: lm-eval's default, 256 tokens)."""
    config = entry.leaves[0].config
    metadata = mapping(getattr(config, "metadata", None))
    generation = mapping(getattr(config, "generation_kwargs", None))
    metric, filter_name = entry.metric.split(",", 1)
    cap = cfg.get("max_gen_toks")
    version = (raw.get("versions") or {}).get(entry.name, metadata.get("version"))
    protocol = {"variant": metadata.get("variant") or f"lm-eval {entry.name}",
                "version": None if version is None else str(version), "fewshot": _fewshot(entry, raw),
                "metric": metric, "filter": filter_name,
                "chat_template": for_kind(cfg.get("apply_chat_template"), entry.kind)}
    if entry.kind == "gen":
        protocol.update(until=list(generation.get("until") or []),
                        max_gen_toks=int(cap) if cap else generation.get("max_gen_toks"))
    return protocol


def _stderr(entry: Entry, reported: dict) -> float | None:
    """The stderr lm-eval reports beside the primary metric ("acc,none" -> "acc_stderr,none");
    None when it reports "N/A" (bootstrap_iters=0, one item, a metric without a stderr)."""
    metric, filter_name = entry.metric.split(",", 1)
    value = reported.get(f"{metric}_stderr,{filter_name}")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fewshot(entry: Entry, raw: dict):
    """The few-shot count lm-eval used: the task's, or its leaves' when they agree (else a mapping)."""
    shots = raw.get("n-shot") or {}
    if entry.name in shots:
        return shots[entry.name]
    per_leaf = {t.task_name: shots.get(t.task_name) for t in entry.leaves}
    values = set(per_leaf.values())
    return values.pop() if len(values) == 1 else per_leaf


# ---------------------------------------------------------------- the suites
def summarise(tasks: dict) -> dict:
    """MC / GEN / AVG and their standard errors from per-task results (docs/evaluation.md), the same in
    percent, the task sets and the GEN tasks' protocols.

    A suite's task set is every task of that kind in `tasks`; one without a score makes the suite's
    mean None (an error is logged), and AVG is None unless every suite that has tasks has a mean.
    Standard errors: see the module docstring (independent tasks; None where a task has none).
    """
    task_sets = {kind: [name for name, t in tasks.items() if t["kind"] == kind] for kind in SUITES}
    means = {kind: _suite_mean(kind, names, tasks) for kind, names in task_sets.items()}
    errors = {kind: _suite_stderr(names, tasks) if means[kind] is not None else None
              for kind, names in task_sets.items()}
    present = [kind for kind in SUITES if task_sets[kind]]
    avg = avg_stderr = None
    if present and None not in (means[kind] for kind in present):
        avg = sum(means[kind] for kind in present) / len(present)
        if None not in (errors[kind] for kind in present):
            avg_stderr = sum(errors[kind] ** 2 for kind in present) ** 0.5 / len(present)
    values = {**means, "avg": avg, **{f"{k}_stderr": v for k, v in errors.items()}, "avg_stderr": avg_stderr}
    percent = {k: None if v is None else round(100 * v, 2 if k in (*SUITES, "avg") else 3)
               for k, v in values.items()}
    gen_protocol = {name: tasks[name]["protocol"] for name in task_sets["gen"] if "protocol" in tasks[name]}
    return {"tasks": tasks, **values, "percent": percent,
            **{f"{kind}_tasks": names for kind, names in task_sets.items()}, "gen_protocol": gen_protocol}


def _suite_stderr(names: list[str], tasks: dict) -> float | None:
    """sqrt(sum SE_i^2) / k over a suite's k tasks (independent); None if one has no stderr."""
    errors = [tasks[name].get("stderr") for name in names]
    if not names or None in errors:
        return None
    return sum(e ** 2 for e in errors) ** 0.5 / len(errors)


def _suite_mean(kind: str, names: list[str], tasks: dict) -> float | None:
    missing = [name for name in names if tasks[name]["score"] is None]
    if missing:
        log.error("%s mean not computed: task(s) %s of its task set %s have no score",
                  kind.upper(), missing, names)
        return None
    return sum(tasks[name]["score"] for name in names) / len(names) if names else None
