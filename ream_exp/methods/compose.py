"""A merging method as three switches (docs/algorithms.md, "Merging as a composition"):

    method.grouping   ream      REAM's pseudo-pruning: centroids = top-N' by the method's score, greedy groups of C
                      hc_smoe   HC-SMoE's average linkage of the mean expert outputs, led by the member nearest the mean
                      m_smoe    M-SMoE's dominants: top-N' by frequency, each other expert joins the one whose
                                router-logit column is most similar (cosine)
    method.align      both | activations | weights | none (REAM 4), matching (M-SMoE's weight matching)
    method.merge      average | ties | multislerp | karcher | sub_moe (moe/merge_ops.py), with merge_density (ties),
                      merge_rank (sub_moe), merge_tol and merge_max_iter (karcher)

ream, hc_smoe and m_smoe are each one point of this grid (their own grouping and alignment, merge=average,
bit for bit what they were); every merging module takes all three switches. The merge weights stay the method's
own (REAM: its saliency; HC-SMoE, M-SMoE: frequency), and so do its other settings.
"""

from __future__ import annotations

from ..config import ConfigError, rule_group_size, shown
from ..moe.merge_ops import MERGE_DEFAULTS, MERGE_OPERATORS, MERGE_PARAMS
from ..plan import Plan
from ..setting_types import Custom
from ..timing import Timings
from .layerwise import run_layerwise
from .observation import Needs
from .protect import keep_apart, protected_experts, protected_info
from .merging import (ALIGN_MODES, align_groups, centred_clusters, check_group_size, group_by_pseudo_pruning,
                      groups_per_router_group, logit_cosine, pca_seed, ream_distance, weight_matching)

GROUPINGS = ("ream", "hc_smoe", "m_smoe")
ALIGN_CHOICES = ALIGN_MODES + ("matching",)
# The alignment and merge settings every merging method shares (the grouping's default is the method's own).
ALIGN_DEFAULTS = dict(align_tokens=32768, pca_dim=64, pca_seed=None)


def composition_defaults(grouping: str) -> dict:
    return dict(grouping=grouping, merge="average", **MERGE_DEFAULTS)


COMPOSITION_CHOICES = dict(grouping=GROUPINGS, merge=MERGE_OPERATORS)


# ---- settings with their own ranges, checked before anything loads ----------------------------------------

def _in_unit_interval(value, setting, parent=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{setting}={shown(value)} is outside (0, 1]: {setting} is the fraction of each task "
                          "vector's entries TIES keeps (method.merge=ties)")


def _positive(value, setting, parent=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{setting}={shown(value)} must be a number > 0: {setting} is the Karcher iteration's "
                          "stopping step in radians (method.merge=karcher)")


def _max_iter(value, setting, parent=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{setting}={shown(value)} must be a positive integer: {setting} is the most iterations "
                          "of the Karcher mean (method.merge=karcher)")


RANK_MEANING = ("the rank Sub-MoE's joint SVD keeps: null (full: the weighted average), an integer >= 1, or a "
                "fraction in (0, 1] of the joint matrix's full rank")


def _rank(value, setting, parent=None):
    whole = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    fraction = isinstance(value, float) and 0 < value <= 1
    if not (whole or fraction):
        raise ConfigError(f"{setting}={shown(value)} is not a rank: {setting} is {RANK_MEANING}")


MERGE_SPECS = dict(
    merge_density=Custom(_in_unit_interval, meaning="the fraction in (0, 1] of each task vector's entries TIES "
                                                    "keeps (method.merge=ties)"),
    merge_rank=Custom(_rank, nullable=True, meaning=f"{RANK_MEANING} (method.merge=sub_moe)"),
    merge_tol=Custom(_positive, meaning="the Karcher iteration's stopping step in radians, > 0 (method.merge=karcher)"),
    merge_max_iter=Custom(_max_iter, meaning="the most iterations of the Karcher mean, >= 1 (method.merge=karcher)"),
)


def check_composition(cfg: dict, own_grouping: str) -> None:
    """The switches' settings together: an operator's setting only beside that operator, a grouping's setting
    only beside that grouping (cfg: the method config as given, defaults not filled in)."""
    merge = cfg.get("merge", "average")
    for op, keys in MERGE_PARAMS.items():
        for key in keys:
            if key in cfg and op != merge:
                raise ConfigError(f"method.{key} applies to method.merge={op} only, and this run merges by "
                                  f"method.merge={merge}; drop method.{key} or set method.merge={op}")
    for key, spec in MERGE_SPECS.items():
        if key in cfg:
            spec.check(cfg[key], f"method.{key}")
    grouping = cfg.get("grouping", own_grouping)
    if own_grouping != "ream" and cfg.get("group_size") is not None and grouping != "ream":
        raise ConfigError(f"method.group_size applies to method.grouping=ream only (REAM's C), and this run groups "
                          f"by method.grouping={grouping}")


def merge_op(s: dict) -> dict | None:
    """The plan's operator: None for the weighted average (the plan then reads as before), else
    {"op": name, **its settings}."""
    if s["merge"] == "average":
        return None
    return {"op": s["merge"], **{key: s[key] for key in MERGE_PARAMS[s["merge"]]}}


def dense_need(s: dict, own: str | None) -> str | None:
    """The mean expert outputs a grouping needs: REAM's and HC-SMoE's group by them; M-SMoE's does not."""
    return own if s["grouping"] in ("ream", "hc_smoe") else None


def ream_group_size(s: dict, num_experts: int, n_keep: int) -> int:
    """REAM's C: method.group_size, or (null) the paper's rule C = max(2, ceil((N - N') / 2))."""
    size = s.get("group_size")
    return rule_group_size(num_experts, n_keep) if size is None else int(size)


def check_grouping(s: dict, num_experts: int, n_keep: int) -> None:
    if s["grouping"] == "ream":
        check_group_size(num_experts, n_keep, ream_group_size(s, num_experts, n_keep))


# ---- the three switches on one layer ---------------------------------------------------------------------

def group_layer(layer, obs, n_keep: int, score, s: dict, protected=frozenset(), dominant=None) -> list[list[int]]:
    """The layer's merge groups (centroid first) by method.grouping, within each router group; each expert of
    `protected` (method.protect, methods/protect.py) a group of its own. `dominant`: the score M-SMoE's grouping
    picks its dominant experts by (None: the frequencies)."""
    grouping = s["grouping"]
    if grouping == "ream":
        distance = ream_distance(obs.mean_outputs, obs.logit_gram, bool(s.get("gate_output", True)))
        size = ream_group_size(s, layer.num_experts, n_keep)
        form = lambda m, k: group_by_pseudo_pruning(score[m], distance[m][:, m], k, size)  # noqa: E731
    elif grouping == "hc_smoe":
        features = obs.mean_outputs
        form = lambda m, k: centred_clusters(features[m], k)  # noqa: E731
    else:
        distance = 1 - logit_cosine(obs.logit_gram)
        freq = obs.freq if dominant is None else dominant
        form = lambda m, k: group_by_pseudo_pruning(freq[m], distance[m][:, m], k, 0)  # noqa: E731
    return groups_per_router_group(layer, n_keep, keep_apart(form, protected, layer.index))


def align_layer(layer, groups, obs, s: dict, seed: int, timings, spill=None) -> dict[int, list[int]]:
    """Neuron permutations by method.align: REAM 4's costs, or M-SMoE's weight matching (matching). `spill`: how
    the PCA of the weight costs holds the layer's experts (merging.pca_weight_features; None: in memory)."""
    if s["align"] == "matching":
        return weight_matching(layer, groups)
    return align_groups(layer, groups, obs.align_x, s["align"], int(s["pca_dim"]), pca_seed(s, seed), timings,
                        obs.take_align_hidden, spill)


def needs_alignment_tokens(s: dict) -> bool:
    return s["align"] in ("both", "activations")


# ---- the layer-wise run every merging method shares ----------------------------------------------------------

def composed_plan(ctx, s: dict, dense: str, plan_layer, own: str) -> Plan:
    """A merging method's plan from its settings `s`: the grouping's C checked on every layer before any
    calibration runs, method.protect's experts found on the uncompressed model, then layer by layer
    (methods/layerwise.py) `plan_layer(layer, obs, n_keep, timings, s, seed, protected, spill)`, observing the mean
    expert outputs of kind `dense` ("gated" | "plain") where the grouping needs them. The plan records the
    settings but align_cache_mb (how it computes, not what: the plan is one) and the timings; `own`: its name
    where the config has none. A streamed run (ctx.stream) spills each layer's experts during the alignment PCA
    (layer_stream.LayerStream.spilled): the same plan, a smaller peak."""
    for layer in ctx.layers:  # reject an impossible C before any calibration runs
        check_grouping(s, layer.num_experts, ctx.n_keep(layer))
    needs = Needs(dense=dense_need(s, dense), align=needs_alignment_tokens(s), sim_tokens=s.get("sim_tokens"),
                  align_tokens=int(s["align_tokens"]), align_cache_mb=s.get("align_cache_mb"))
    timings = Timings()
    protected = protected_experts(ctx, s["protect"])  # from the uncompressed model, before any layer changes
    spill = getattr(getattr(ctx, "stream", None), "spilled", None)
    layers = run_layerwise(ctx, lambda l, o, k, t: plan_layer(l, o, k, t, s, ctx.seed, protected.get(l.index, set()),
                                                              spill), needs, bool(s["sequential"]), timings)
    recorded = {k: v for k, v in s.items() if k != "align_cache_mb"}
    return Plan(ctx.cfg.get("name", own), ctx.ratio, layers,
                info={"settings": recorded, "timings": dict(timings), **protected_info(protected)})
