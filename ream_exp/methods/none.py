"""`method=none`: the uncompressed model (every expert kept), the baseline of every comparison."""

from ..plan import LayerPlan, Plan
from .base import Context

NEEDS_CALIBRATION = False


def plan(ctx: Context) -> Plan:
    layers = [LayerPlan(l.index, l.num_experts, list(range(l.num_experts))) for l in ctx.layers]
    return Plan("none", 0.0, layers)
