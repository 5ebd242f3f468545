"""`method=random`: drop N - N' experts chosen uniformly at random per layer (seeded), a sanity floor."""

import torch

from ..plan import LayerPlan, Plan
from .base import Context

NEEDS_CALIBRATION = False


def plan(ctx: Context) -> Plan:
    gen = torch.Generator().manual_seed(int(ctx.cfg.get("seed", ctx.seed)))
    layers = []
    for layer in ctx.layers:
        keep = sorted(torch.randperm(layer.num_experts, generator=gen)[: ctx.n_keep(layer)].tolist())
        layers.append(LayerPlan(layer.index, layer.num_experts, keep))
    return Plan("random", ctx.ratio, layers)
