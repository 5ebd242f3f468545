"""Config helpers: the `${pkg:...}` resolver and every check that must fail before a model is loaded.

Every error raised on purpose is a `ConfigError`: `ream-exp` prints it as one line (`error: ...`) and
keeps the traceback in the run directory's error.txt; any other exception is a bug and shows its trace.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from . import PACKAGE_DIR
from .moe import family_for
from .moe.discover import TopKOutOfRange
from .moe.groups import router_group_refusal
from .plan import experts_to_keep


class ConfigError(ValueError):
    """A setting or input the run cannot use, with a message naming the setting and what is allowed."""


def shown(value) -> str:
    """A setting's value as the user would type it on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def require_number(setting: str, value, meaning: str, integer: bool = False):
    """`value` as a float (an int when `integer`); otherwise a ConfigError naming the setting."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        hint = ""
        if isinstance(value, (list, tuple, ListConfig)):
            hint = f" (to sweep several values: ream-exp -m {setting}=" + ",".join(map(str, value)) + ")"
        raise ConfigError(f"{setting}={shown(value)} is not {'an integer' if integer else 'a number'}: "
                          f"{setting} is {meaning}{hint}")
    return int(value) if integer else float(value)


def require_positive_int(setting: str, value, meaning: str) -> int:
    number = require_number(setting, value, meaning, integer=True)
    if number < 1:
        raise ConfigError(f"{setting}={number} must be a positive integer: {setting} is {meaning}")
    return number



def group_size_for(table, ratio, default=None):
    """REAM's group size C for this ratio from a model's {ratio: C} table (model.group_size), else default.

    default None leaves C to `rule_group_size`, applied once the model's expert count N is known.
    """
    default = None if default is None else int(default)
    if table is None:
        return default
    by_ratio = {float(k): int(v) for k, v in table.items()}
    return by_ratio.get(float(ratio), default)


def rule_group_size(num_experts: int, n_keep: int) -> int:
    """The paper's rule C = max(2, ceil((N - N') / 2)), raised to ceil(N / N') where N' groups of C
    could not hold all N experts (only at extreme ratios: 8 -> 2 gives 3, raised to 4)."""
    rule = max(2, -(-(num_experts - n_keep) // 2))
    return max(rule, -(-num_experts // max(n_keep, 1)))


if not OmegaConf.has_resolver("pkg"):
    # ${pkg:toy/checkpoint} -> absolute path inside the installed ream_exp package
    OmegaConf.register_new_resolver("pkg", lambda rel: str(PACKAGE_DIR / rel))
if not OmegaConf.has_resolver("group_size"):
    # ${group_size:${oc.select:model.group_size,null},${ratio},null} -> the paper's C for this model and
    # ratio, or null (then C follows rule_group_size from the model's N and N')
    OmegaConf.register_new_resolver("group_size", group_size_for)


def _is_local_path(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).exists()


def check_model_path(model_cfg: DictConfig) -> None:
    path = model_cfg.get("path")
    if path in (None, "", "???"):
        raise ConfigError(f"model={model_cfg.get('name')} needs model.path (a checkpoint directory or hub id)")
    path = str(path)
    must_be_local = model_cfg.get("name") == "local" or _is_local_path(path)
    if must_be_local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.path {path!r} is not a directory (model={model_cfg.get('name')})")


def check_placement_keys(model: dict) -> None:
    """model.max_memory and model.offload_folder place weights only with a model.device_map (run by
    ream_exp.settings.check_settings; their values are checked by the schema)."""
    for key in ("max_memory", "offload_folder"):
        if model.get(key) not in (None, "", {}) and not model.get("device_map"):
            raise ConfigError(f"model.{key} is set but model.device_map is null: {key} places weights only "
                              "with a device_map (e.g. model.device_map=auto)")


def check_placement(model_cfg: DictConfig) -> None:
    """model.offload_folder, where accelerate writes the weights a device map sends to disk, can be written."""
    if model_cfg.get("offload_folder"):
        require_writable_dir("model.offload_folder", model_cfg.offload_folder,
                             "where accelerate writes the weights the device map sends to disk")


def require_writable_dir(setting: str, value, meaning: str) -> Path:
    """`value` as a directory this process can write (made if missing); otherwise a ConfigError."""
    path = Path(str(value)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}={str(value)!r} cannot be written ({exc.strerror or exc}): {setting} is "
                          f"{meaning}, a writable directory") from exc
    return path


def check_cache_dir(cache_dir) -> None:
    """The caches are written after the model has loaded: make sure now that they can be."""
    if cache_dir in (None, ""):
        return
    require_writable_dir("cache_dir", cache_dir, "where the caches go (set cache_dir=DIR or REAM_EXP_CACHE)")


def check_expert_counts(model_config, ratio: float) -> tuple[int, int]:
    """N' = N - round(N * ratio) must keep at least top_k experts (docs/algorithms.md), and a group-limited router's
    groups (moe/groups.py)."""
    try:
        family = family_for(model_config)
    except TopKOutOfRange as exc:
        raise ConfigError(f"model config {getattr(model_config, '_name_or_path', '')!r}: {exc}") from None
    except ValueError as exc:  # an architecture this project cannot compress
        raise ConfigError(f"model.path: {exc}") from None
    n, k = family.num_experts, family.top_k
    n_keep = experts_to_keep(n, ratio)
    if n_keep < k:
        raise ConfigError(f"ratio={ratio} keeps {n_keep} of {n} experts, fewer than top_k={k}; "
                          f"the largest ratio allowed here is {(n - k) / n:.4f}")
    refusal = router_group_refusal(model_config, ratio, n, n_keep)
    if refusal is not None:
        raise ConfigError(refusal)
    return n, n_keep
