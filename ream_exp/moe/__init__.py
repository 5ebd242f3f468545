"""All architecture knowledge: where routers and experts live, how to read, merge and slice them."""

from .families import FAMILIES, Family, family_for, supported_model_types
from .layers import (
    MoELayer,
    activated,
    activated_into,
    canonical_weights,
    decoder_layers,
    expert_hidden,
    expert_output,
    experts_hidden,
    experts_products,
    moe_layers,
    router_probs,
    write_canonical_weights,
)
from .groups import router_groups, within_router_groups
from .surgery import apply_layer_plan, apply_plan, keep_experts, merge_group, update_expert_counts

__all__ = [
    "FAMILIES", "Family", "family_for", "supported_model_types", "MoELayer", "activated", "activated_into",
    "canonical_weights",
    "decoder_layers", "expert_hidden", "expert_output", "experts_hidden", "experts_products", "moe_layers",
    "router_probs",
    "write_canonical_weights", "apply_layer_plan", "apply_plan", "keep_experts", "merge_group",
    "update_expert_counts", "router_groups", "within_router_groups",
]
