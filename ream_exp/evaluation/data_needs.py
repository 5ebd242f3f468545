"""What an eval config's tasks read besides the model, found before any load: the hub datasets (for the
run's dataset check) and the nltk data some tasks load at run time.

ifeval's checks tokenize with nltk's punkt_tab, which lm-eval downloads when the task first loads;
`check_runtime_data` (called by ream_exp.run.validate, before any load) refuses a run whose punkt_tab is
missing, saying how to fetch it once.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .eval_config import as_dict, mapping, task_names
from .task_index import leaf_configs, leaf_tasks, task_index

# dataset_path values that name a datasets builder of local files, not a hub dataset
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")

# Data files a task loads at run time besides its dataset, by the directory of lm-eval's task YAML:
# {directory name: [(nltk resource, package name for `python -m nltk.downloader`)]}.
NLTK_DATA = {"ifeval": [("tokenizers/punkt_tab", "punkt_tab")]}


def task_datasets(cfg) -> list[tuple[str, tuple]]:
    """(f"eval task {name}", (hub id, config, revision)) for every hub dataset the eval's tasks read.

    Read from lm-eval's task index (groups and tags expanded to their tasks), without building a task;
    code-executing tasks that will be skipped, custom_dataset loaders and local files need none.
    """
    cfg = as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return []
    index = task_index(cfg)
    needed = []
    for name in names:
        for task in leaf_configs(index, name, set()):
            path = task.get("dataset_path")
            if (not path or task.get("custom_dataset") or path in LOCAL_BUILDERS or Path(path).exists()
                    or (task.get("unsafe_code") and not cfg.get("allow_code_eval"))):
                continue
            revision = mapping(task.get("dataset_kwargs")).get("revision")
            needed.append((f"eval task {name}", (str(path), task.get("dataset_name"), revision)))
    return needed


def check_runtime_data(cfg) -> None:
    """Refuses, before any load, a run whose tasks need nltk data that is not installed (ifeval's
    punkt_tab, which lm-eval would otherwise try to download mid-run: a node without network fails
    after the compression). One line naming the tasks and the command that fetches the data once."""
    cfg = as_dict(cfg)
    names = task_names(cfg)
    if not names:
        return
    index = task_index(cfg)
    needs: dict[str, list[str]] = {}
    for name in names:
        for leaf, _ in leaf_tasks(index, name, set()):
            path = getattr(index.get(leaf), "yaml_path", None) if leaf else None
            for part in Path(path).parent.parts if path else ():
                for resource, package in NLTK_DATA.get(part, []):
                    needs.setdefault(package, [resource])
                    needs[package].append(name)
    missing = {package: sorted(set(users[1:])) for package, users in needs.items() if not _nltk_has(users[0])}
    if missing:
        packages = " ".join(sorted(missing))
        users = sorted({user for names in missing.values() for user in names})
        raise ConfigError(f"eval.tasks {users} need nltk data {sorted(missing)}, which is not installed "
                          f"(nltk.data.path); fetch it once with `python -m nltk.downloader {packages}` "
                          "(or drop the task from eval.tasks)")


def _nltk_has(resource: str) -> bool:
    import nltk

    try:
        nltk.data.find(resource)
    except LookupError:
        return False
    return True
