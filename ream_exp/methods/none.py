"""`method=none`: the uncompressed model (every expert kept), the baseline of every comparison."""

from ..plan import LayerPlan, Plan
from .base import Context, method_settings

DEFAULTS: dict = {}  # no settings besides name
NEEDS_CALIBRATION = False


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """The uncompressed model has no settings: any key is refused before weights load."""
    method_settings(cfg, DEFAULTS, label="none")


def plan(ctx: Context) -> Plan:
    layers = [LayerPlan(l.index, l.num_experts, list(range(l.num_experts))) for l in ctx.layers]
    return Plan("none", 0.0, layers)
