"""`method=ean`: expert activation norm pruning (REAP's EAN baseline).

S_i = sum_{x in X_i} ||E_i(x)||_2 over the tokens routed to expert i (docs/algorithms.md).
"""

from .base import Context, method_settings, prune_plan
from .protect import PROTECT

DEFAULTS = dict(protect="none")  # experts never removed (methods/protect.py)
CHOICES = dict(protect=PROTECT)
NEEDS_CALIBRATION = True


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """EAN's one setting, method.protect; any other key is refused before weights load."""
    method_settings(cfg, DEFAULTS, CHOICES, label="EAN")


def plan(ctx: Context):
    return prune_plan(ctx, "ean", method_settings(ctx.cfg, DEFAULTS, CHOICES, label="EAN")["protect"])
