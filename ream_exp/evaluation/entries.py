"""From the names an eval config asks for to scored entries: the lm-eval Task or Group answering each
name, whether it is MC or GEN, and the metric it is scored by.

Whether a task is MC or GEN is read from lm-eval's own `output_type` (multiple_choice / loglikelihood
-> MC, generate_until -> GEN), never from a list kept here. Primary metric: MC -> acc (docs/evaluation.md;
acc, not acc_norm); GEN -> the task's first metric under its first filter (gsm8k:
exact_match,strict-match; ifeval: prompt_level_strict_acc,none; humaneval: pass_at_k,create_test =
pass@1). `metrics: {task: "metric,filter"}` in the config overrides this (conf/eval/gen.yaml does, for
the paper's GEN protocol: docs/algorithms.md, "GEN protocol"). A change here that changes a score
bumps scores.EVAL_VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .eval_config import mapping

# lm-eval output types answered by scoring fixed continuations (no sampling): the MC side.
MC_OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling")
MC_METRIC = "acc"  # MC is scored by acc, not acc_norm (docs/evaluation.md)


@dataclass
class Entry:
    """One scored task: a requested name with the lm-eval Task or Group that answers it."""

    name: str
    requested: str  # the name in the config (differs from `name` only for a tag's tasks)
    obj: Any  # lm_eval Task or Group
    leaves: list  # the leaf Tasks that run
    kind: str  # "mc" | "gen"
    metric: str  # the "metric,filter" key lm-eval reports

    @property
    def unsafe(self) -> bool:
        # lm-eval sets Task.UNSAFE_CODE from the YAML's `unsafe_code` (code-executing tasks).
        return any(getattr(task, "UNSAFE_CODE", False) for task in self.leaves)


def entries_for(task_manager, name: str, cfg: dict) -> list[Entry]:
    """Builds the lm-eval objects for one requested name (this loads the task's dataset)."""
    loaded = task_manager.load([name])
    override = mapping(cfg.get("metrics")).get(name)
    if name in loaded.get("groups", {}):
        group = loaded["groups"][name]
        if not group.has_aggregation:
            raise ValueError(
                f"lm-eval group '{name}' reports no aggregate score (no aggregate_metric_list); "
                "list its subtasks in eval.tasks instead"
            )
        return [_entry(name, name, group, group.get_all_tasks(), override)]
    return [_entry(t.task_name, name, t, [t], override) for t in loaded["tasks"].values()]


def _entry(name: str, requested: str, obj, leaves: list, override: str | None) -> Entry:
    kinds = {"mc" if t.OUTPUT_TYPE in MC_OUTPUT_TYPES else "gen" for t in leaves}
    if len(kinds) != 1:
        raise ValueError(f"lm-eval group '{name}' mixes MC and GEN subtasks; list them separately")
    kind = kinds.pop()
    return Entry(name, requested, obj, leaves, kind, _primary_metric(obj, leaves[0], kind, override))


def _primary_metric(obj, first_leaf, kind: str, override: str | None) -> str:
    if override:
        metric = override
    elif kind == "mc":
        metric = MC_METRIC
    elif hasattr(obj, "aggregate_metric_list"):  # a GEN group: its first aggregated metric
        metric = obj.aggregate_metric_list[0].metric
    else:  # aggregation() lists the task's metrics in its metric_list order
        metric = next(iter(obj.aggregation()))
    return metric if "," in metric else f"{metric},{_first_filter(first_leaf)}"


def _first_filter(task) -> str:
    # lm-eval reports every metric once per filter; tasks without filters report under "none".
    filters = task.config.filter_list
    return filters[0]["name"] if isinstance(filters, list) and filters else "none"


def apply_num_fewshot(entries: list[Entry], num_fewshot) -> None:
    """A per-task {name: n} mapping is set on each task here; a single int goes to lm-eval."""
    per_task = mapping(num_fewshot)
    for entry in entries:
        if entry.requested in per_task:
            for task in entry.leaves:
                task.set_config(key="num_fewshot", value=int(per_task[entry.requested]))


def by_kind(entries: list[Entry]) -> dict[str, list[Entry]]:
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.kind, []).append(entry)
    return groups
