"""`method=msan`: Mean Squared Activation Norm pruning (MSAN, arXiv 2606.15716), gate-free.

S_i = (1/|X_i|) sum_{x in X_i} ||E_i(x)||_2^2, MAN (man.py) with the squared norm, which weighs an expert's
large outputs more; experts never routed score 0 (docs/algorithms.md, "Gate-free activation norms").
"""

from .base import Context, method_settings, prune_plan
from .man import CHOICES, DEFAULTS, NEEDS_CALIBRATION, check

__all__ = ["CHOICES", "DEFAULTS", "NEEDS_CALIBRATION", "check", "plan"]


def plan(ctx: Context):
    return prune_plan(ctx, "msan", method_settings(ctx.cfg, DEFAULTS, CHOICES, "msan")["protect"])
