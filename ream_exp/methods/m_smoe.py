"""`method=m_smoe`: the merge stage of MC-SMoE ("Merge, Then Compress", arXiv 2310.01334), docs/algorithms.md.

Per MoE layer:
    dominant  = the N' experts with the highest frequency |X_i| / |X|
    groups    = every other expert joins the dominant expert whose router-logit column is most similar
                (cosine over the calibration tokens)
    P_j       = Hungarian weight matching of j's neurons to the dominant expert's
                (maximise sum_p <[gate|up|down]_c[p], [gate|up|down]_j[P p]>)
    W_c       = sum_j freq_j / sum(freq) P_j(W_j)
MC-SMoE allots dominant experts non-uniformly across layers; here every layer keeps N' (as in REAM's
comparison). A group-limited router's groups each get N'/n_group dominant experts and merge only their
own experts. Non-sequential by default (`method.sequential` switches it).
"""

from __future__ import annotations

from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .layerwise import run_layerwise
from .observation import Needs
from .merging import group_by_pseudo_pruning, groups_per_router_group, logit_cosine, merge_layer_plan, weight_matching

NEEDS_CALIBRATION = True

DEFAULTS = dict(sequential=False)


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in; unknown keys are refused."""
    return method_settings(cfg, DEFAULTS, label="M-SMoE")


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    settings(cfg)


def plan_layer(layer, obs, n_keep: int, timings: Timings):
    freq = obs.freq
    with timings("group"):
        distance = 1 - logit_cosine(obs.logit_gram)
        groups = groups_per_router_group(layer, n_keep, lambda m, k: group_by_pseudo_pruning(
            freq[m], distance[m][:, m], k, 0))
    with timings("align"):
        perms = weight_matching(layer, groups)
    return merge_layer_plan(layer, groups, freq, perms, freq, {"freq": freq.tolist()})


def plan(ctx: Context) -> Plan:
    s = settings(ctx.cfg)
    timings = Timings()
    layers = run_layerwise(ctx, plan_layer, Needs(), bool(s["sequential"]), timings)
    return Plan(ctx.cfg.get("name", "m_smoe"), ctx.ratio, layers, info={"settings": s, "timings": dict(timings)})
