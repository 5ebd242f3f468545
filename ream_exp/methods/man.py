"""`method=man`: Mean Activation Norm pruning (MAN, arXiv 2606.15716), gate-free.

S_i = (1/|X_i|) sum_{x in X_i} ||E_i(x)||_2, the mean over the tokens routed to expert i of its unweighted
output norm (no routing weight: the paper's task-agnostic, routed-token-averaged form); experts never
routed score 0 (docs/algorithms.md, "Gate-free activation norms"). `method=msan` squares the norm (msan.py).
"""

from .base import Context, method_settings, prune_plan
from .protect import PROTECT

NEEDS_CALIBRATION = True
DEFAULTS = dict(protect="none")
CHOICES = dict(protect=PROTECT)


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings (method.protect), checked before any weights are loaded."""
    method_settings(cfg, DEFAULTS, CHOICES, str(cfg.get("name", "man")))


def plan(ctx: Context):
    return prune_plan(ctx, "man", method_settings(ctx.cfg, DEFAULTS, CHOICES, "man")["protect"])
