"""`method=reap`: Router-weighted Expert Activation Pruning (REAP, arXiv 2510.13999).

S_i = (1/|X_i|) sum_{x in X_i} g_i(x) ||E_i(x)||_2, with g_i(x) the routing weight the model applies
(renormalised over the top-k when the model renormalises). Experts never routed score 0 (SPEC 2).
"""

from .base import Context, prune_plan

NEEDS_CALIBRATION = True


def plan(ctx: Context):
    return prune_plan(ctx, "reap")
