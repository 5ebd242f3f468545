"""`method=random`: drop N - N' experts chosen uniformly at random per layer (seeded), a sanity floor.

A group-limited router's groups each drop (N - N') / n_group of their own experts, drawn the same way.
"""

import torch

from ..moe import within_router_groups
from ..plan import LayerPlan, Plan
from .base import Context, method_settings

NEEDS_CALIBRATION = False
DEFAULTS = {"seed": None}  # null: the run seed


def check(cfg: dict, num_experts: int, n_keep: int) -> None:
    """`method.seed` (default: the run seed) is the only setting; any other key is refused before weights load."""
    method_settings(cfg, DEFAULTS, label="random")


def plan(ctx: Context) -> Plan:
    gen = torch.Generator().manual_seed(int(ctx.cfg.get("seed", ctx.seed)))

    def draw(members: list[int], k: int) -> list[int]:  # one layer has a single group unless group-limited
        return [members[i] for i in torch.randperm(len(members), generator=gen)[:k].tolist()]

    layers = []
    for layer in ctx.layers:
        keep = within_router_groups(layer.num_experts, ctx.n_keep(layer), layer.router_groups, draw)
        layers.append(LayerPlan(layer.index, layer.num_experts, keep))
    return Plan("random", ctx.ratio, layers)
