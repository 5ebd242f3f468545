"""`method=router_norm`: pruning by the magnitude of each expert's router row, from the weights alone.

S_i = ||W_router[i, :]||_2, the L2 norm of expert i's row of the router weight; per layer the N - N' experts
with the lowest S_i are removed (docs/algorithms.md, "Scores without calibration data").
No calibration token is read, unless method.protect=super asks for the observation (methods/protect.py).
"""

from .base import WEIGHTS_CHOICES as CHOICES, WEIGHTS_DEFAULTS as DEFAULTS, weights_method

__all__ = ["CHOICES", "DEFAULTS", "NEEDS_CALIBRATION", "check", "needs_calibration", "plan", "settings"]

NEEDS_CALIBRATION = False  # by default; `needs_calibration` says for a given config
settings, check, needs_calibration, plan = weights_method("router_norm", "router_norm")
