"""Config helpers: the `${pkg:...}` resolver and every check that must fail before a model is loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import PACKAGE_DIR



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
        raise ValueError(f"model={model_cfg.get('name')} needs model.path (a checkpoint directory or hub id)")
    path = str(path)
    must_be_local = model_cfg.get("name") == "local" or _is_local_path(path)
    if must_be_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"model.path {path!r} is not a directory (model={model_cfg.get('name')})")


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio} is outside [0, 1): it is the fraction of experts removed per MoE layer")
    return ratio


def check_expert_counts(model_config, ratio: float) -> tuple[int, int]:
    """N' = N - round(N * ratio) must keep at least top_k experts (SPEC 1)."""
    from .moe import family_for
    from .plan import experts_to_keep

    family = family_for(model_config.model_type)
    n = int(getattr(model_config, family.count_key))
    k = int(model_config.num_experts_per_tok)
    n_keep = experts_to_keep(n, ratio)
    if n_keep < k:
        raise ValueError(f"ratio={ratio} keeps {n_keep} of {n} experts, fewer than top_k={k}; "
                         f"the largest ratio allowed here is {(n - k) / n:.4f}")
    return n, n_keep
