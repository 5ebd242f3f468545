"""`method=aimer`: AIMER, calibration-free expert pruning from the weights alone (arXiv 2603.18492).

A_i = mean|w| / sqrt(mean w^2) over every entry of expert i's gate, up and down matrices; per layer the
N - N' experts with the highest A_i are removed (docs/algorithms.md, "Scores without calibration data").
No calibration token is read, unless method.protect=super asks for the observation (methods/protect.py).
"""

from .base import WEIGHTS_CHOICES as CHOICES, WEIGHTS_DEFAULTS as DEFAULTS, weights_method

__all__ = ["CHOICES", "DEFAULTS", "NEEDS_CALIBRATION", "check", "needs_calibration", "plan", "settings"]

NEEDS_CALIBRATION = False  # by default; `needs_calibration` says for a given config
settings, check, needs_calibration, plan = weights_method("aimer", "AIMER")
