"""Reading an eval config (one of conf/eval/*.yaml, a DictConfig or a plain dict): its task names, its
include_path, the bootstrap resamples behind its standard errors, settings given once or per kind."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError

# lm-eval's default (100000) is for bootstrapped metrics on big suites and takes minutes; every metric
# here is a mean, whose stderr lm-eval computes in closed form whatever this number (> 0) is. For the
# bootstrapped rest, 1000 resamples estimate a stderr to about 1/sqrt(2 * 1000) = 2% of itself.
DEFAULT_BOOTSTRAP_ITERS = 1000


def as_dict(cfg) -> dict:
    """The eval config as a plain dict; None is `name: none`, no tasks."""
    if cfg is None:
        return {"name": "none", "tasks": []}
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def task_names(cfg) -> list[str]:
    """The task names an eval config asks for; none for `name: none`."""
    cfg = as_dict(cfg)
    if cfg.get("name") == "none":
        return []
    return list(cfg.get("tasks") or [])


def include_path(cfg) -> str | None:
    """eval.include_path resolved (a directory of the user's task YAMLs), or None."""
    path = cfg.get("include_path")
    if path is None:
        return None
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"eval.include_path {str(path)!r} is not a directory")
    return str(path)


def bootstrap_iters(cfg: dict) -> int:
    iters = cfg.get("bootstrap_iters")
    return DEFAULT_BOOTSTRAP_ITERS if iters is None else int(iters)


def mapping(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def for_kind(value, kind: str) -> bool:
    """A setting given as one bool or per kind ({mc: false, gen: true})."""
    return bool(value.get(kind, False)) if isinstance(value, dict) else bool(value)
