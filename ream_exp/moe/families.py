"""What ream-exp knows about each MoE architecture of transformers 5.

transformers 5 stores the routed experts of a layer as one module with fused 3D tensors
(`gate_up_proj`, `down_proj`, optional biases) and a router module whose `.weight` is [E, H].
Everything that differs between families is written down here, once:

- where the sparse block lives in a decoder layer and what its router is called;
- which config key holds the expert count;
- how the router turns logits into the probabilities sigma(x) (softmax or sigmoid);
- whether the router is group-limited (n_group) and how it scores a group;
- how the fused expert tensors are laid out (concatenated or interleaved gate/up, transposed or not).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    count_key: str                  # config key of the routed-expert count
    router_attr: str = "gate"       # attribute of the sparse block holding the router
    scoring: str = "softmax"        # how sigma(x) comes from the router logits: softmax | sigmoid
    # Group-limited routers (n_group > 1, see moe/groups.py): how many of a router group's best experts
    # make up the group's score, so each group must keep at least that many; 0 = no group-limited router.
    group_score_experts: int = 0
    # Router tensors indexed by expert besides `.weight` (router bias, e_score_correction_bias) need no
    # entry here: surgery slices every router/experts tensor whose first dim is the expert count.
    # Shared (always-on) experts are separate modules of the block and are never touched.


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("qwen3_moe", ("qwen3_moe",), "num_experts"),
        Family("qwen2_moe", ("qwen2_moe",), "num_experts"),  # + shared_expert, shared_expert_gate
        Family("mixtral", ("mixtral",), "num_local_experts"),
        Family("olmoe", ("olmoe",), "num_experts"),
        # sigmoid router with e_score_correction_bias and n_group; + shared_experts
        Family("deepseek_v3", ("deepseek_v3",), "n_routed_experts", scoring="sigmoid", group_score_experts=2),
        Family("gpt_oss", ("gpt_oss",), "num_local_experts", router_attr="router"),  # router bias
        # Qwen3-Next: Qwen2-MoE's block (softmax router, gated shared expert) between linear-attention layers.
        Family("qwen3_next", ("qwen3_next",), "num_experts"),
        # GLM-4.5 / 4.5-Air: DeepSeek-V3's router (sigmoid + e_score_correction_bias, n_group), shared experts.
        Family("glm4_moe", ("glm4_moe",), "n_routed_experts", scoring="sigmoid", group_score_experts=2),
        # DeepSeek-V2(-Lite): softmax router (greedy or group-limited top-k), shared experts.
        Family("deepseek_v2", ("deepseek_v2",), "n_routed_experts", group_score_experts=1),  # group max
    )
}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(model_type: str) -> Family:
    """The family of a transformers `config.model_type`, or a clear error listing what is supported."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not a supported MoE architecture; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None
