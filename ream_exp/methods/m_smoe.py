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

The grouping, the alignment and the merge are switches (methods/compose.py): method.grouping=ream|hc_smoe,
method.align=both|activations|weights|none (REAM 4's costs, with align_tokens, pca_dim, pca_seed; default
matching, the weight matching above), method.merge=ties|multislerp|karcher|sub_moe (m_smoe_ties.yaml, ...);
the merge weights stay the frequencies. method.group_size is REAM's C with method.grouping=ream.

`method.saliency` (default freq, M-SMoE's) picks the score of the dominant experts and merge weights among
methods/scores.py's (reap, man, msan, aimer, router_norm; zero scores floored as REAM's); `method.protect=super`
keeps REAP's super experts as groups of one (methods/protect.py).
"""

from __future__ import annotations

from ..plan import Plan
from .base import Context, method_settings
from ..timing import Timings
from .compose import (ALIGN_CHOICES, ALIGN_DEFAULTS, COMPOSITION_CHOICES, MERGE_SPECS, align_layer,
                      check_composition, check_grouping, composed_plan, composition_defaults, group_layer, merge_op)
from .merging import floor_zero_saliency, merge_layer_plan
from .protect import PROTECT
from .scores import SALIENCIES
from . import scores as expert_scores

NEEDS_CALIBRATION = True

DEFAULTS = dict(sequential=False, align="matching", **ALIGN_DEFAULTS, group_size=None, saliency="freq",
                protect="none", **composition_defaults("m_smoe"))
CHOICES = dict(align=ALIGN_CHOICES, saliency=SALIENCIES, protect=PROTECT, **COMPOSITION_CHOICES)
SPECS = MERGE_SPECS


def settings(cfg: dict) -> dict:
    """The method config with defaults filled in; unknown keys and bad choices are refused."""
    return method_settings(cfg, DEFAULTS, CHOICES, "M-SMoE", SPECS)


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    s = settings(cfg)
    check_composition(cfg, "m_smoe")
    check_grouping(s, num_experts, n_keep)


def dominance(layer, obs, name: str):
    """The score dominant experts and merge weights follow: frequency, else a methods/scores.py score floored
    as REAM's (an expert never routed can still be merged)."""
    return obs.freq if name == "freq" else floor_zero_saliency(expert_scores.saliency(name, layer, obs))


def plan_layer(layer, obs, n_keep: int, timings: Timings, s: dict, seed: int, protected=frozenset(), spill=None):
    freq = dominance(layer, obs, s["saliency"])
    with timings("group"):
        groups = group_layer(layer, obs, n_keep, freq, s, protected, dominant=freq)
    with timings("align"):
        perms = align_layer(layer, groups, obs, s, seed, timings, spill)
    return merge_layer_plan(layer, groups, freq, perms, freq, {s["saliency"]: freq.tolist()}, merge_op(s))


def plan(ctx: Context) -> Plan:
    return composed_plan(ctx, settings(ctx.cfg), "plain", plan_layer, "m_smoe")
