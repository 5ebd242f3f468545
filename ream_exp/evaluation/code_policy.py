"""Which code-executing tasks may run: the containment policy.

Code-executing tasks (lm-eval's `unsafe_code`: toy_code, humaneval, humaneval_instruct, livecodebench)
run only with allow_code_eval=true, and only when their scorer runs the code through ream_exp.sandbox
(`sandbox.contained` hooks). lm-eval's own humaneval and humaneval_instruct are replaced by
ream_exp/code_tasks/humaneval*.yaml, whose directory is always on the task search path (task_index); any
other code-executing task is refused. Without allow_code_eval they are skipped, with a warning and a
reason in the scores' "skipped".

Checked twice: from the task YAMLs before any weights load (`check_code_tasks_contained`, by
checks.check_tasks), and on the built tasks before lm-eval runs (`drop_unsafe`, by harness.evaluate).
"""

from __future__ import annotations

import logging

from ..config import ConfigError
from ..sandbox import is_contained
from .entries import Entry
from .task_index import leaf_tasks

log = logging.getLogger(__name__)

CODE_EVAL_HINT = "set eval.allow_code_eval=true to run it (executes model-written code)"
# The code-executing tasks shipped with contained scoring (ream_exp.sandbox): named in refusals.
CONTAINED_CODE_TASKS = ("toy_code, humaneval, humaneval_instruct and livecodebench (and its window "
                        "livecodebench_2502_2505)")


def _refusal(uncontained: list[str]) -> ConfigError:
    return ConfigError(
        f"eval.tasks: {uncontained} execute model-written code outside ream_exp.sandbox; "
        f"with eval.allow_code_eval the code-executing tasks allowed are {CONTAINED_CODE_TASKS} "
        "(ream_exp/code_tasks/ holds the contained replacements of lm-eval tasks)"
    )


def check_code_tasks_contained(names: list[str], index) -> None:
    """Refuses, before any weights load, a code-executing task whose scoring hooks are not contained.

    The task's YAML is read with its `!function` hooks resolved (lm-eval's own loader: it imports the
    task's utils module, builds no dataset); `drop_unsafe` checks the built tasks again.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    uncontained = []
    for leaf in sorted({leaf for name in names for leaf, _ in leaf_tasks(index, name, set()) if leaf}):
        entry = index.get(leaf)
        if entry is None or not (entry.cfg or {}).get("unsafe_code") or not getattr(entry, "yaml_path", None):
            continue
        cfg = load_yaml(entry.yaml_path, resolve_func=True)
        hooks = [cfg.get("process_results")] + [m.get("metric") for m in cfg.get("metric_list") or []]
        if not any(callable(h) and is_contained(h) for h in hooks):
            uncontained.append(leaf)
    if uncontained:
        raise _refusal(uncontained)


def drop_unsafe(entries: list[Entry], allowed: bool) -> tuple[list[Entry], dict]:
    """Leaves out code-executing tasks unless allowed (lm-eval would raise mid-suite instead);
    allowed ones must run their code through ream_exp.sandbox."""
    if allowed:
        _check_contained(entries)
        return entries, {}
    unsafe = [e.name for e in entries if e.unsafe]
    if unsafe:
        log.warning("Skipping code-executing task(s) %s: %s", unsafe, CODE_EVAL_HINT)
    skipped = {name: f"unsafe_code task skipped; {CODE_EVAL_HINT}" for name in unsafe}
    return [e for e in entries if not e.unsafe], skipped


def _check_contained(entries: list[Entry]) -> None:
    uncontained = sorted({t.task_name for e in entries for t in e.leaves
                          if getattr(t, "UNSAFE_CODE", False) and not _runs_code_contained(t)})
    if uncontained:
        raise _refusal(uncontained)


def _runs_code_contained(task) -> bool:
    """Whether a code-executing task scores through a sandbox.contained hook (process_results or a
    metric function), the only places lm-eval runs a task's own code on the model's output."""
    hooks = [task.config.process_results] + [m.get("metric") for m in task.config.metric_list or []]
    return any(is_contained(hook) for hook in hooks if callable(hook))
