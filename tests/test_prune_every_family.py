"""Removing experts that are never routed leaves the logits unchanged, in every supported family.

A family qualifies when the weights it applies to the top-k do not depend on the experts outside the
top-k: softmax renormalised over the top-k (Qwen3-MoE, Qwen3-Next, and Qwen2-MoE and OLMoE with
norm_topk_prob, Mixtral, GPT-OSS) or per-expert sigmoid scores (DeepSeek-V3, GLM-4.5). Then the same experts
are picked with the same weights and the logits differ only by rounding. DeepSeek-V2 weighs its top-k by
their softmax probabilities over all N experts, unrenormalised: removing experts renormalises that softmax
over the kept ones, so its reference is the unpruned model with each token's top-k weights divided by the
probability mass the kept experts hold (the same experts, the weights the pruned router computes). Its tiny
model routes group-limited (n_group = 2), so the removed experts come equally from each router group.
The Qwen3-MoE case with every pruning method is in test_prune.py.
"""

import contextlib

import pytest
import torch

from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from tests.test_prune import _logits
from tests.tolerances import assert_f32_close

# families whose tiny default does not renormalise the top-k weights
RENORMALISED = {"qwen2_moe": {"norm_topk_prob": True}, "olmoe": {"norm_topk_prob": True}}
# families whose router has no such option: softmax over all experts, top-k weights not renormalised
UNRENORMALISED = {"deepseek_v2"}


@contextlib.contextmanager
def _weights_renormalised_over(model, kept: dict[int, list[int]]):
    """The unpruned model weighing each token's top-k as a router over only the `kept` experts of each
    layer does: softmax probabilities divided by the probability mass of the kept experts."""
    def hook(keep):
        def renormalise(_router, _args, out):
            logits, weights, index = out
            mass = logits.float().softmax(-1)[:, keep].sum(-1, keepdim=True)
            return logits, (weights / mass).to(weights.dtype), index
        return renormalise

    hooks = [l.router.register_forward_hook(hook(kept[l.index])) for l in moe_layers(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _unrouted_per_group(stats, layer) -> int:
    """The fewest never-routed experts in any router group of `layer` (the whole layer: one group)."""
    never = stats[layer.index].count == 0
    return int(never.view(layer.router_groups, -1).sum(-1).min())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_removing_never_routed_experts_keeps_the_logits(family):
    model = tiny_model(family, num_experts=16, top_k=2, layers=2, seed=3, **RENORMALISED.get(family, {}))
    ids, mask = tiny_batch(batch=2, seq=5, pad_last=0)  # 10 tokens x top-2 over 16 experts: gaps everywhere
    before = _logits(model, ids, mask)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.0, {"name": "reap"}, progress=False)
    stats = ctx.stats()
    unrouted = {i: set(torch.nonzero(s.count == 0).flatten().tolist()) for i, s in stats.items()}
    layers = moe_layers(model)
    # a group-limited router loses the same number of experts from each of its n_group groups
    n_drop = min(l.router_groups * _unrouted_per_group(stats, l) for l in layers)
    assert n_drop >= 2, "test precondition: every MoE layer (router group) has experts that are never routed"
    ratio = n_drop / 16
    plan = get_method("reap").plan(Context(model, {"input_ids": ids, "attention_mask": mask}, ratio,
                                           {"name": "reap"}, progress=False))
    assert all(len(lp.removed) == n_drop and set(lp.removed) <= unrouted[lp.layer] for lp in plan.layers)
    if family in UNRENORMALISED:
        with _weights_renormalised_over(model, {lp.layer: lp.keep for lp in plan.layers}):
            renormalised = _logits(model, ids, mask)
        assert (renormalised - before).abs().max() > 1e-2  # the renormalisation matters here
        before = renormalised
    apply_plan(model, plan)
    assert all(layer.num_experts == 16 - n_drop for layer in moe_layers(model))
    # a softmax over fewer experts and smaller router matmuls, in every layer: rounding only
    assert_f32_close(_logits(model, ids, mask), before, model.config.hidden_size,
                     model.config.num_hidden_layers + 1, msg=family)
