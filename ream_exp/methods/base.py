"""What every method receives, and the shared step of pruning methods: keep the top-N' by score."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..calib import calibration_batches
from ..config import ConfigError, require_number, shown
from ..moe import MoELayer, moe_layers, within_router_groups
from ..moe.offload import execution_device
from ..observe import LayerStats, load_cache_entry, load_stats, observe, save_stats
from ..plan import LayerPlan, Plan, experts_to_keep


@dataclass
class Context:
    """A compression job: the model, its calibration tokens and the settings of the method."""

    model: nn.Module
    calib: dict[str, torch.Tensor] | None
    ratio: float
    cfg: dict  # the method's config group
    seed: int = 0
    batch_size: int = 8
    progress: bool = True
    # Routing statistics of the uncompressed model depend only on model and tokens, not on the ratio:
    # pruning methods share them across ratios through this file (None = no cache).
    stats_path: Path | None = None
    # model.stream=true: the ream_exp.stream.LayerStream that loads, writes and frees decoder layers
    # (the model is a meta skeleton); None: the model is in memory whole.
    stream: object | None = None
    _stats: dict[int, LayerStats] | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[MoELayer]:
        return moe_layers(self.model)

    def n_keep(self, layer: MoELayer) -> int:
        return experts_to_keep(layer.num_experts, self.ratio)

    def batches(self):
        if self.calib is None:
            raise ValueError(f"method {self.cfg.get('name')!r} needs calibration data, but none was built")
        return calibration_batches(self.calib, self.batch_size)

    def stats(self) -> dict[int, LayerStats]:
        """Routing statistics of the (uncompressed) model over the calibration tokens, observed once."""
        if self._stats is None and self.stats_path is not None:  # a damaged entry is deleted and rebuilt
            device = execution_device(self.model.get_input_embeddings())  # not meta when offloaded
            self._stats = load_cache_entry(self.stats_path, lambda p: load_stats(p, device))
        if self._stats is None:
            self._stats = observe(self.model, self.batches(), progress=self.progress)
            if self.stats_path is not None:
                save_stats(self._stats, self.stats_path)
        return self._stats


def method_settings(cfg: dict, defaults: dict, choices: dict | None = None, label: str = "method") -> dict:
    """A method's config with `defaults` filled in; unknown keys, choices and types are checked.

    Every key must be one of `defaults`; a key with `choices` must take one of them; a key whose default
    is a bool must be true or false, an int an integer (a None default allows null or an integer).
    """
    method = cfg.get("name", label)
    unknown = sorted(set(cfg) - set(defaults) - {"name"})
    if unknown:
        raise ConfigError(f"unknown {label} setting(s) {', '.join('method.' + k for k in unknown)} (method={method}); "
                          f"allowed keys: {', '.join(sorted(defaults))}")
    s = {**defaults, **{k: v for k, v in cfg.items() if k != "name"}}
    for key, valid in (choices or {}).items():
        if s[key] not in valid:
            raise ConfigError(f"method.{key}={s[key]!r}; valid: {', '.join(valid)}")
    for key, default in defaults.items():
        if isinstance(default, bool) and not isinstance(s[key], bool):
            raise ConfigError(f"method.{key}={shown(s[key])} must be true or false (method={method})")
        if (default is None or type(default) is int) and s[key] is not None:
            s[key] = require_number(f"method.{key}", s[key], f"an integer setting of method={method}", integer=True)
    return s


def top_experts(score: torch.Tensor, n_keep: int, router_groups: int = 1) -> list[int]:
    """Indices of the n_keep highest scores (ties: lower index first), returned in ascending order.

    With a group-limited router (router_groups = n_group > 1) each router group keeps its own
    n_keep / n_group highest, so the same number is pruned from every group (moe/groups.py)."""
    def best(members: list[int], k: int) -> list[int]:
        return sorted(members, key=lambda i: (-float(score[i]), i))[:k]

    return within_router_groups(len(score), n_keep, router_groups, best)


def prune_plan(ctx: Context, score_name: str) -> Plan:
    """Per layer, drop the N - N' experts with the lowest `score_name` saliency (SPEC 3), the same number
    from each router group of a group-limited router.

    A streamed model (ctx.stream) is observed layer by layer on the original layers' outputs, which sums
    exactly what the one-pass observation of the whole model sums."""
    if ctx.stream is not None:
        from .layerwise import Needs, run_layerwise

        def plan_layer(layer, obs, n_keep, _timings):
            return _prune_layer(layer, obs.routing_stats(), n_keep, score_name)

        return Plan(ctx.cfg.get("name", score_name), ctx.ratio, run_layerwise(ctx, plan_layer, Needs(), False))
    stats = ctx.stats()
    layers = [_prune_layer(layer, stats[layer.index], ctx.n_keep(layer), score_name) for layer in ctx.layers]
    return Plan(ctx.cfg.get("name", score_name), ctx.ratio, layers)


def _prune_layer(layer: MoELayer, s: LayerStats, n_keep: int, score_name: str) -> LayerPlan:
    score = s.score(score_name)
    keep = top_experts(score, n_keep, layer.router_groups)
    return LayerPlan(layer.index, layer.num_experts, keep, saliency=score.tolist(), scores=s.to_dict())
