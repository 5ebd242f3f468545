"""`method=ream`: Router-weighted Expert Activation Merging (REAM, arXiv 2604.04356), docs/algorithms.md.

One implementation serves `ream` (the paper's formulas), `ream_official` (the official code's choices)
and every ablation of the paper: they differ only in conf/method/*.yaml. Per MoE layer, in order:

    S_i      = reap  mean_{X_i} g_i(x) ||E_i(x)||        (saliency_form=paper: g = applied routing weight)
                     mean_{X_i} sigma_i(x)^p ||E_i(x)||  (saliency_form=official: un-renormalised sigma,
                                                          p = 2 with gated_sim, else 1)
               freq  |X_i| / |X|
    S_i = 0 -> min(0.5, smallest non-zero S)
    delta_E  = (cos(mean_x o_i, mean_x o_j) + 1) / 2,  o_i = sigma_i E_i (gated_sim) or E_i
    delta_g  = 1 - d / max d,  d = distance of the L2-normalised router-logit columns (gate_output)
    distance = 1 - (delta_E + delta_g) / 2
    groups   = pseudo-pruning: centroids = top-N' by S; each, in descending S, takes its nearest
               unassigned non-centroids until it has C = group_size members (0: nearest centroid);
               with a group-limited router, inside each router group (N'/n_group centroids each)
    P_j      = linear_sum_assignment(cdist(activations) + cdist(PCA weight features))   (align)
               the randomised PCA is seeded with pca_seed (null: the run seed); token samples use the run seed
    W_c      = sum_j S_j / sum(S) P_j(W_j) in float32; the centroid's router row is kept.

sequential=true (default) observes each layer on the outputs of the already-compressed layers.
Similarity statistics can be estimated on `sim_tokens` sampled tokens; saliency is always exact.
"""

from __future__ import annotations

from ..config import rule_group_size
from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .layerwise import run_layerwise
from .observation import Needs
from .merging import (ALIGN_MODES, align_groups, check_group_size, floor_zero_saliency, group_by_pseudo_pruning,
                      groups_per_router_group, merge_layer_plan, pca_seed, ream_distance)

NEEDS_CALIBRATION = True

DEFAULTS = dict(
    saliency="reap", saliency_form="paper", gated_sim=True, gate_output=True, group_size=16,
    align="both", pca_dim=64, pca_seed=None, align_tokens=32768, sim_tokens=None, sequential=True,
    align_cache_mb=None,
)
CHOICES = dict(saliency=("reap", "freq"), saliency_form=("paper", "official"), align=ALIGN_MODES)


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in and every choice checked."""
    return method_settings(cfg, DEFAULTS, CHOICES, "REAM")


def group_size(s: dict, num_experts: int, n_keep: int) -> int:
    """C as configured, or (method.group_size null: no model table, no override) the paper's rule."""
    return rule_group_size(num_experts, n_keep) if s["group_size"] is None else s["group_size"]


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """Settings and group size, checked from the model's config before any weights are loaded."""
    check_group_size(num_experts, n_keep, group_size(settings(cfg), num_experts, n_keep))


def saliency(obs, s: dict):
    if s["saliency"] == "freq":
        return obs.freq
    if s["saliency_form"] == "official":
        return obs.sigma_score(2 if s["gated_sim"] else 1)
    return obs.reap_score


def plan_layer(layer, obs, n_keep: int, timings: Timings, s: dict, seed: int):
    score = floor_zero_saliency(saliency(obs, s))
    with timings("group"):
        distance = ream_distance(obs.mean_outputs, obs.logit_gram, bool(s["gate_output"]))
        groups = groups_per_router_group(layer, n_keep, lambda m, k: group_by_pseudo_pruning(
            score[m], distance[m][:, m], k, s["group_size"]))
    with timings("align"):
        perms = align_groups(layer, groups, obs.align_x, s["align"], int(s["pca_dim"]), pca_seed(s, seed), timings,
                             obs.take_align_hidden)
    scores = {"freq": obs.freq.tolist(), "reap": obs.reap_score.tolist(),
              "reap_official": obs.sigma_score(2 if s["gated_sim"] else 1).tolist()}
    return merge_layer_plan(layer, groups, score, perms, score, scores)


def plan(ctx: Context) -> Plan:
    s = settings(ctx.cfg)
    first = ctx.layers[0]  # every MoE layer has the same N, so one C serves all (recorded in plan.info)
    s["group_size"] = group_size(s, first.num_experts, ctx.n_keep(first))
    for layer in ctx.layers:  # reject an impossible C before any calibration runs
        check_group_size(layer.num_experts, ctx.n_keep(layer), s["group_size"])
    needs = Needs(dense="gated" if s["gated_sim"] else "plain", align=s["align"] in ("both", "activations"),
                  sim_tokens=s["sim_tokens"], align_tokens=int(s["align_tokens"]), align_cache_mb=s["align_cache_mb"])
    timings = Timings()
    layers = run_layerwise(ctx, lambda l, o, k, t: plan_layer(l, o, k, t, s, ctx.seed), needs,
                           bool(s["sequential"]), timings)
    recorded = {k: v for k, v in s.items() if k != "align_cache_mb"}  # how it computes, not what (the plan is one)
    return Plan(ctx.cfg.get("name", "ream"), ctx.ratio, layers, info={"settings": recorded, "timings": dict(timings)})
