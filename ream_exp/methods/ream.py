"""`method=ream`: Router-weighted Expert Activation Merging (REAM, arXiv 2604.04356), docs/algorithms.md.

One implementation serves `ream` (the paper's formulas), `ream_official` (the official code's choices)
and every ablation of the paper: they differ only in conf/method/*.yaml. Per MoE layer, in order:

    S_i      = reap  mean_{X_i} g_i(x) ||E_i(x)||        (saliency_form=paper: g = applied routing weight)
                     mean_{X_i} sigma_i(x)^p ||E_i(x)||  (saliency_form=official: un-renormalised sigma,
                                                          p = 2 with gated_sim, else 1)
               freq  |X_i| / |X|
               man, msan, aimer, router_norm             (methods/scores.py: gate-free norms, weights only)
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
    protect  = super: REAP's super experts are centroids of groups of one (methods/protect.py)

The grouping, the alignment and the merge are switches (methods/compose.py): method.grouping=hc_smoe|m_smoe groups
as those methods do, method.align=matching aligns by weight matching, method.merge=ties|multislerp|karcher|sub_moe
merges by another operator (ream_ties.yaml, ream_karcher.yaml, ...); the merge weights stay S_j / sum(S).

sequential=true (default) observes each layer on the outputs of the already-compressed layers.
Similarity statistics can be estimated on `sim_tokens` sampled tokens; saliency is always exact.
"""

from __future__ import annotations

from ..config import rule_group_size
from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .compose import (ALIGN_CHOICES, COMPOSITION_CHOICES, MERGE_SPECS, align_layer, check_composition,
                      check_grouping, composed_plan, composition_defaults, group_layer, merge_op)
from .merging import floor_zero_saliency, merge_layer_plan
from .protect import PROTECT
from .scores import SALIENCIES
from . import scores as expert_scores

NEEDS_CALIBRATION = True

DEFAULTS = dict(
    saliency="reap", saliency_form="paper", gated_sim=True, gate_output=True, group_size=16,
    align="both", pca_dim=64, pca_seed=None, align_tokens=32768, sim_tokens=None, sequential=True, protect="none",
    align_cache_mb=None, **composition_defaults("ream"),
)
CHOICES = dict(saliency=SALIENCIES, saliency_form=("paper", "official"), align=ALIGN_CHOICES, protect=PROTECT,
               **COMPOSITION_CHOICES)
SPECS = MERGE_SPECS


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in and every choice checked."""
    return method_settings(cfg, DEFAULTS, CHOICES, "REAM", SPECS)


def group_size(s: dict, num_experts: int, n_keep: int) -> int:
    """C as configured, or (method.group_size null: no model table, no override) the paper's rule."""
    return rule_group_size(num_experts, n_keep) if s["group_size"] is None else s["group_size"]


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """Settings, the switches together and the group size, checked from the model's config before any
    weights are loaded."""
    s = settings(cfg)
    check_composition(cfg, "ream")
    check_grouping({**s, "group_size": group_size(s, num_experts, n_keep)}, num_experts, n_keep)


def saliency(obs, s: dict, layer=None):
    if s["saliency"] not in ("reap", "freq"):  # man, msan, aimer, router_norm (the weights ones read `layer`)
        return expert_scores.saliency(s["saliency"], layer, obs)
    if s["saliency"] == "freq":
        return obs.freq
    if s["saliency_form"] == "official":
        return obs.sigma_score(2 if s["gated_sim"] else 1)
    return obs.reap_score


def plan_layer(layer, obs, n_keep: int, timings: Timings, s: dict, seed: int, protected=frozenset(), spill=None):
    raw = saliency(obs, s, layer)
    score = floor_zero_saliency(raw)
    with timings("group"):
        groups = group_layer(layer, obs, n_keep, score, s, protected)
    with timings("align"):
        perms = align_layer(layer, groups, obs, s, seed, timings, spill)
    scores = {"freq": obs.freq.tolist(), "reap": obs.reap_score.tolist(),
              "reap_official": obs.sigma_score(2 if s["gated_sim"] else 1).tolist()}
    if s["saliency"] not in scores:
        scores[s["saliency"]] = raw.tolist()
    return merge_layer_plan(layer, groups, score, perms, score, scores, merge_op(s))


def plan(ctx: Context) -> Plan:
    s = settings(ctx.cfg)
    first = ctx.layers[0]  # every MoE layer has the same N, so one C serves all (recorded in plan.info)
    s["group_size"] = group_size(s, first.num_experts, ctx.n_keep(first))
    return composed_plan(ctx, s, "gated" if s["gated_sim"] else "plain", plan_layer, "ream")
