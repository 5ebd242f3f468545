"""`method=hc_smoe`: HC-SMoE, retraining-free merging by hierarchical clustering (arXiv 2410.08589), docs/algorithms.md.

Per MoE layer:
    f_i       = mean_x E_i(x) over all calibration tokens (unweighted expert outputs)
    clusters  = average-linkage agglomerative clustering of f on Euclidean distance, into N' clusters
    centroid  = the member closest to its cluster's mean feature (its router row is kept)
    W_c       = sum_j freq_j / sum(freq) P_j(W_j), P_j aligning neurons on activations (docs/algorithms.md REAM 4)
A group-limited router's groups are clustered one at a time (N'/n_group clusters each).
Non-sequential by default, as HC-SMoE observes the original model (`method.sequential` switches it).

The grouping, the alignment and the merge are switches (methods/compose.py): method.grouping=ream|m_smoe,
method.align=matching, method.merge=ties|multislerp|karcher|sub_moe (hc_smoe_karcher.yaml, ...); the merge
weights stay the frequencies. method.group_size is REAM's C with method.grouping=ream (null: the paper's rule).
`method.protect=super` keeps REAP's super experts out of the clustering, as clusters of one (methods/protect.py).
"""

from __future__ import annotations

from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .compose import (ALIGN_CHOICES, COMPOSITION_CHOICES, MERGE_SPECS, align_layer, check_composition,
                      check_grouping, composed_plan, composition_defaults, group_layer, merge_op)
from .merging import centred_clusters, merge_layer_plan
from .protect import PROTECT

NEEDS_CALIBRATION = True

# pca_seed: seed of the PCA used when align is both | weights (null: the run seed), as in REAM.
DEFAULTS = dict(align="activations", align_tokens=32768, sim_tokens=None, sequential=False, pca_dim=64, pca_seed=None,
                align_cache_mb=None, group_size=None, protect="none", **composition_defaults("hc_smoe"))
CHOICES = dict(align=ALIGN_CHOICES, protect=PROTECT, **COMPOSITION_CHOICES)
SPECS = MERGE_SPECS

__all__ = ["centred_clusters", "check", "plan", "settings"]


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in; unknown keys and bad choices are refused."""
    return method_settings(cfg, DEFAULTS, CHOICES, "HC-SMoE", SPECS)


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    s = settings(cfg)
    check_composition(cfg, "hc_smoe")
    check_grouping(s, num_experts, n_keep)


def plan_layer(layer, obs, n_keep: int, timings: Timings, s: dict, seed: int, protected=frozenset(), spill=None):
    with timings("group"):
        groups = group_layer(layer, obs, n_keep, obs.freq, s, protected)
    with timings("align"):
        perms = align_layer(layer, groups, obs, s, seed, timings, spill)
    return merge_layer_plan(layer, groups, obs.freq, perms, obs.freq, {"freq": obs.freq.tolist()}, merge_op(s))


def plan(ctx: Context) -> Plan:
    return composed_plan(ctx, settings(ctx.cfg), "plain", plan_layer, "hc_smoe")
