"""`method=aimer`: AIMER, calibration-free expert pruning from the weights alone (arXiv 2603.18492).

A_i = mean|w| / sqrt(mean w^2) over every entry of expert i's gate, up and down matrices; per layer the
N - N' experts with the highest A_i are removed (docs/algorithms.md, "Scores without calibration data").
No calibration token is read, unless method.protect=super asks for the observation (methods/protect.py).
"""

from .base import Context, method_settings, weights_prune_plan
from .protect import PROTECT

NEEDS_CALIBRATION = False  # by default; `needs_calibration` says for a given config
DEFAULTS = dict(protect="none")
CHOICES = dict(protect=PROTECT)


def settings(cfg: dict) -> dict:
    return method_settings(cfg, DEFAULTS, CHOICES, "AIMER")


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The settings, checked before any weights are loaded."""
    settings(cfg)


def needs_calibration(cfg: dict) -> bool:
    """Calibration tokens only to find the experts method.protect protects."""
    return settings(cfg)["protect"] != "none"


def plan(ctx: Context):
    return weights_prune_plan(ctx, "aimer", settings(ctx.cfg)["protect"])
