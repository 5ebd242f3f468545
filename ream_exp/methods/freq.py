"""`method=freq`: frequency pruning. S_i = |X_i| / |X|, the share of tokens routed to expert i (SPEC 2)."""

from .base import Context, prune_plan

NEEDS_CALIBRATION = True


def plan(ctx: Context):
    return prune_plan(ctx, "freq")
