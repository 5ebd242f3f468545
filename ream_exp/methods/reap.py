"""`method=reap`: Router-weighted Expert Activation Pruning (REAP, arXiv 2510.13999).

S_i = (1/|X_i|) sum_{x in X_i} g_i(x) ||E_i(x)||_2, with g_i(x) the routing weight the model applies
(renormalised over the top-k when the model renormalises). Experts never routed score 0 (docs/algorithms.md).

`method=reap_official` is the official REAM code's REAP pruning baseline (its `--merging none`): the same
ranking with method.saliency_form=official, S_i = mean_{X_i} sigma_i(x)^2 ||E_i(x)|| (sigma the full,
un-renormalised softmax: REAM's official saliency with its gated similarity), floored and tie-broken as
that code does, and method.sequential=true (see `base`).
"""

from . import ream
from .base import PRUNE_CHOICES, PRUNE_DEFAULTS, Context, check_prune_settings, saliency_prune_plan

NEEDS_CALIBRATION = True
# The settings (ream_exp.settings checks them before anything loads) and their check: `base`'s two switches.
DEFAULTS, CHOICES, check = PRUNE_DEFAULTS, PRUNE_CHOICES, check_prune_settings


def layer_score(obs, form: str, _ctx: Context):
    """S of one observed layer in `form`: REAM's saliency, which is REAP's in the paper form."""
    return ream.saliency(obs, {"saliency": "reap", "saliency_form": form, "gated_sim": True})


def plan(ctx: Context):
    return saliency_prune_plan(ctx, "reap", layer_score)
