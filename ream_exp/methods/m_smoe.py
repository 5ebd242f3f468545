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

`method.saliency` (default freq, M-SMoE's) picks the score of the dominant experts and merge weights among
methods/scores.py's (reap, man, msan, aimer, router_norm; zero scores floored as REAM's); `method.protect=super`
keeps REAP's super experts as groups of one (methods/protect.py).
"""

from __future__ import annotations

from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .layerwise import run_layerwise
from .observation import Needs
from .merging import (floor_zero_saliency, group_by_pseudo_pruning, groups_per_router_group, logit_cosine,
                      merge_layer_plan, weight_matching)
from .protect import PROTECT, keep_apart, protected_experts, protected_info
from .scores import SALIENCIES
from . import scores as expert_scores

NEEDS_CALIBRATION = True

DEFAULTS = dict(sequential=False, saliency="freq", protect="none")
CHOICES = dict(saliency=SALIENCIES, protect=PROTECT)


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in; unknown keys and bad choices are refused."""
    return method_settings(cfg, DEFAULTS, CHOICES, label="M-SMoE")


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    settings(cfg)


def dominance(layer, obs, name: str):
    """The score dominant experts and merge weights follow: frequency, else a methods/scores.py score floored
    as REAM's (an expert never routed can still be merged)."""
    return obs.freq if name == "freq" else floor_zero_saliency(expert_scores.saliency(name, layer, obs))


def plan_layer(layer, obs, n_keep: int, timings: Timings, saliency: str = "freq", protected=frozenset()):
    freq = dominance(layer, obs, saliency)
    with timings("group"):
        distance = 1 - logit_cosine(obs.logit_gram)
        groups = groups_per_router_group(layer, n_keep, keep_apart(lambda m, k: group_by_pseudo_pruning(
            freq[m], distance[m][:, m], k, 0), protected, layer.index))
    with timings("align"):
        perms = weight_matching(layer, groups)
    return merge_layer_plan(layer, groups, freq, perms, freq, {saliency: freq.tolist()})


def plan(ctx: Context) -> Plan:
    s = settings(ctx.cfg)
    timings = Timings()
    protected = protected_experts(ctx, s["protect"])  # from the uncompressed model
    layers = run_layerwise(ctx, lambda l, o, k, t: plan_layer(l, o, k, t, s["saliency"], protected.get(l.index, set())),
                           Needs(), bool(s["sequential"]), timings)
    return Plan(ctx.cfg.get("name", "m_smoe"), ctx.ratio, layers,
                info={"settings": s, "timings": dict(timings), **protected_info(protected)})
