"""`method=hc_smoe`: HC-SMoE, retraining-free merging by hierarchical clustering (arXiv 2410.08589), docs/algorithms.md.

Per MoE layer:
    f_i       = mean_x E_i(x) over all calibration tokens (unweighted expert outputs)
    clusters  = average-linkage agglomerative clustering of f on Euclidean distance, into N' clusters
    centroid  = the member closest to its cluster's mean feature (its router row is kept)
    W_c       = sum_j freq_j / sum(freq) P_j(W_j), P_j aligning neurons on activations (docs/algorithms.md REAM 4)
A group-limited router's groups are clustered one at a time (N'/n_group clusters each).
Non-sequential by default, as HC-SMoE observes the original model (`method.sequential` switches it).
"""

from __future__ import annotations

from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .layerwise import run_layerwise
from .observation import Needs
from .merging import (ALIGN_MODES, align_groups, average_linkage, closest_to_mean, groups_per_router_group,
                      merge_layer_plan, pca_seed)

NEEDS_CALIBRATION = True

# pca_seed: seed of the PCA used when align is both | weights (null: the run seed), as in REAM.
DEFAULTS = dict(align="activations", align_tokens=32768, sim_tokens=None, sequential=False, pca_dim=64, pca_seed=None,
                align_cache_mb=None)
CHOICES = dict(align=ALIGN_MODES)


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in; unknown keys and bad choices are refused."""
    return method_settings(cfg, DEFAULTS, CHOICES, "HC-SMoE")


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    settings(cfg)


def centred_clusters(features, n_clusters: int) -> list[list[int]]:
    """Average-linkage clusters of the experts' features, each led by its member closest to the mean."""
    groups = []
    for cluster in average_linkage(features, n_clusters):
        rep = closest_to_mean(features, cluster)
        groups.append([rep] + [j for j in cluster if j != rep])
    return groups


def plan_layer(layer, obs, n_keep: int, timings: Timings, s: dict, seed: int):
    features = obs.mean_outputs
    with timings("group"):
        groups = groups_per_router_group(layer, n_keep, lambda m, k: centred_clusters(features[m], k))
    with timings("align"):
        perms = align_groups(layer, groups, obs.align_x, s["align"], int(s["pca_dim"]), pca_seed(s, seed), timings,
                             obs.take_align_hidden)
    return merge_layer_plan(layer, groups, obs.freq, perms, obs.freq, {"freq": obs.freq.tolist()})


def plan(ctx: Context) -> Plan:
    s = settings(ctx.cfg)
    needs = Needs(dense="plain", align=s["align"] in ("both", "activations"), sim_tokens=s["sim_tokens"],
                  align_tokens=int(s["align_tokens"]), align_cache_mb=s["align_cache_mb"])
    timings = Timings()
    layers = run_layerwise(ctx, lambda l, o, k, t: plan_layer(l, o, k, t, s, ctx.seed), needs,
                           bool(s["sequential"]), timings)
    recorded = {k: v for k, v in s.items() if k != "align_cache_mb"}  # how it computes, not what (the plan is one)
    return Plan(ctx.cfg.get("name", "hc_smoe"), ctx.ratio, layers, info={"settings": recorded,
                                                                        "timings": dict(timings)})
