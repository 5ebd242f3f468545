"""`method=freq`: frequency pruning. S_i = |X_i| / |X|, the share of tokens routed to expert i (docs/algorithms.md).

`method=freq_official` is the official REAM code's frequency pruning baseline (its `--merging none
--saliency freq`): method.sequential=true and method.saliency_form=official, where S_i is |X_i| per
calibration batch, the scale that code scores on. The ranking is the same; the scale decides whether the
zero floor min(0.5, smallest non-zero S) ties never-routed experts with the least-routed one (see `base`).
"""

from .base import PRUNE_CHOICES, PRUNE_DEFAULTS, Context, check_prune_settings, saliency_prune_plan

NEEDS_CALIBRATION = True
# The settings (ream_exp.settings checks them before anything loads) and their check: `base`'s two switches.
DEFAULTS, CHOICES, check = PRUNE_DEFAULTS, PRUNE_CHOICES, check_prune_settings


def layer_score(obs, form: str, ctx: Context):
    """S of one observed layer in `form`."""
    return obs.count / ctx.n_batches if form == "official" else obs.freq


def plan(ctx: Context):
    return saliency_prune_plan(ctx, "freq", layer_score)
