"""Removing experts that are never routed leaves the logits unchanged, in every supported family.

A family qualifies when the weights it applies to the top-k do not depend on the experts outside the
top-k: softmax renormalised over the top-k (Qwen3-MoE, Qwen2-MoE and OLMoE with norm_topk_prob, Mixtral,
GPT-OSS) or per-expert sigmoid scores (DeepSeek-V3). Then the same experts are picked with the same weights
and the logits differ only by rounding. The Qwen3-MoE case with every pruning method is in test_prune.py.
"""

import pytest
import torch

from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from tests.test_prune import _logits
from tests.tolerances import assert_f32_close

# families whose tiny default does not renormalise the top-k weights
RENORMALISED = {"qwen2_moe": {"norm_topk_prob": True}, "olmoe": {"norm_topk_prob": True}}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_removing_never_routed_experts_keeps_the_logits(family):
    model = tiny_model(family, num_experts=16, top_k=2, layers=2, seed=3, **RENORMALISED.get(family, {}))
    ids, mask = tiny_batch(batch=2, seq=5, pad_last=0)  # 10 tokens x top-2 over 16 experts: gaps everywhere
    before = _logits(model, ids, mask)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.0, {"name": "reap"}, progress=False)
    unrouted = {i: set(torch.nonzero(s.count == 0).flatten().tolist()) for i, s in ctx.stats().items()}
    n_drop = min(len(u) for u in unrouted.values())
    assert n_drop >= 2, "test precondition: every MoE layer has experts that are never routed"
    ratio = n_drop / 16
    plan = get_method("reap").plan(Context(model, {"input_ids": ids, "attention_mask": mask}, ratio,
                                           {"name": "reap"}, progress=False))
    assert all(len(lp.removed) == n_drop and set(lp.removed) <= unrouted[lp.layer] for lp in plan.layers)
    apply_plan(model, plan)
    assert all(layer.num_experts == 16 - n_drop for layer in moe_layers(model))
    # a softmax over fewer experts and smaller router matmuls, in every layer: rounding only
    assert_f32_close(_logits(model, ids, mask), before, model.config.hidden_size,
                     model.config.num_hidden_layers + 1, msg=family)
