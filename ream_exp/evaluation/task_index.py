"""lm-eval's task index, read without building a task: which leaf tasks a task, group or tag name stands
for, and the version each task's YAML declares.

One TaskManager per include_path is kept (indexing every lm-eval YAML takes seconds).
ream_exp/code_tasks is always on its search path, after lm-eval's own tasks, so that its contained
humaneval and humaneval_instruct replace lm-eval's (code_policy). Only lm-eval's log lines a user can
act on are shown.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..code_tasks import CODE_TASKS_DIR
from .eval_config import as_dict, include_path, mapping, task_names


class _OwnOverrides(logging.Filter):
    """Drops lm-eval's "Task 'humaneval' from <ream_exp/code_tasks/...> overrides existing task from ..."
    warning, logged by every run: replacing lm-eval's humaneval is ream-exp's design (docs/evaluation.md),
    not news. An override by a task of eval.include_path is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Task '%s' from %s overrides existing task") and len(args) > 1
                    and Path(str(args[1])).resolve().is_relative_to(CODE_TASKS_DIR.resolve()))


class _NothingToAct(logging.Filter):
    """lm-eval's notices a ream-exp user cannot act on: `--metadata` hints for tasks that take no kwargs,
    and the HF wrapper's remarks on being handed an already-loaded model (which is how ream-exp calls it)."""

    NOTICES = ("Custom kwargs can be passed to `--metadata`", "`pretrained` model kwarg is not of type",
               "Passed an already-initialized model through `pretrained`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES) and not any(n in str(record.msg) for n in self.NOTICES)


def _quiet_lm_eval() -> None:
    """Only lm-eval's warnings a user can act on are shown: not its progress notes (INFO), nor the notices
    _OwnOverrides and _NothingToAct drop."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name, kind in (("lm_eval.tasks._index", _OwnOverrides), ("lm_eval.api.task", _NothingToAct),
                       ("lm_eval.models.huggingface", _NothingToAct)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    # Indexing every lm-eval YAML takes seconds, so one manager per include_path is kept.
    # CODE_TASKS_DIR comes after lm-eval's tasks, so its humaneval replaces the built-in one.
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    paths = [str(CODE_TASKS_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths)


def task_index(cfg: dict):
    """lm-eval's index ({name: entry}) of the eval config's task search path."""
    return task_manager(include_path(cfg)).task_index


def leaf_tasks(index, name: str, seen: set, groups: dict | None = None) -> list[tuple[str, dict]]:
    """(leaf task name, its YAML config) for each leaf task a task, group or tag name stands for; the
    groups passed through go into `groups` ({name: YAML config}) when given."""
    entry = index.get(name)
    if entry is None or name in seen:
        return []
    seen.add(name)
    kind = entry.kind.name
    if kind == "TAG":
        members = [other for other, e in index.items() if name in e.tags]
    elif kind == "GROUP":
        members = list((entry.cfg or {}).get("task") or [])
        if groups is not None:
            groups[name] = entry.cfg or {}
    else:
        return [(name, entry.cfg or {})]
    leaves = []
    for member in members:
        if isinstance(member, dict):  # an inline task: its own keys over the task it names
            base = index.get(member.get("task"))
            leaves.append((member.get("task"), {**((base.cfg or {}) if base is not None else {}), **member}))
        else:
            leaves += leaf_tasks(index, str(member), seen, groups)
    return leaves


def leaf_configs(index, name: str, seen: set) -> list[dict]:
    """The YAML configs of the leaf tasks a task, group or tag name stands for."""
    return [cfg for _, cfg in leaf_tasks(index, name, seen)]


def task_versions(cfg) -> dict:
    """{task or group name: the version its YAML declares (metadata.version, None if none)} for every
    task, group and leaf task the eval config names, read from lm-eval's task index without building one."""
    cfg = as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return {}
    index = task_index(cfg)
    configs, seen = {}, set()
    for name in names:
        configs.update((leaf, leaf_cfg) for leaf, leaf_cfg in leaf_tasks(index, name, seen, configs) if leaf)
    return {name: mapping(configs[name].get("metadata")).get("version") for name in sorted(configs)}
