"""Pruning invariants: ratio 0 is a no-op, unrouted experts go first, renormalised routing is unaffected."""

import pytest
import torch

from ream_exp.methods import Context, get_method, top_experts
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model
from tests.tolerances import assert_f32_close, f32_atol


def _ctx(model, ids, mask, ratio, name):
    return Context(model, {"input_ids": ids, "attention_mask": mask}, ratio, {"name": name}, progress=False)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", ["none", "random", "freq", "ean", "reap"])
def test_ratio_zero_changes_no_logit(name):
    model = tiny_model("qwen3_moe")
    ids, mask = tiny_batch()
    before = _logits(model, ids, mask)
    plan = get_method(name).plan(_ctx(model, ids, mask, 0.0, name))
    apply_plan(model, plan)
    assert all(l.num_experts == 8 for l in moe_layers(model))
    assert torch.equal(_logits(model, ids, mask), before)


def test_top_experts_ties_and_order():
    assert top_experts(torch.tensor([0.5, 2.0, 0.5, 1.0]), 3) == [0, 1, 3]
    assert top_experts(torch.tensor([3.0, 1.0, 2.0]), 1) == [0]


def _sparse_routing_case(norm_topk_prob):
    """16 experts, top-2, few tokens without pads: several experts are never routed in every layer."""
    model = tiny_model("qwen3_moe", num_experts=16, top_k=2, layers=2, norm_topk_prob=norm_topk_prob, seed=3)
    ids, mask = tiny_batch(batch=2, seq=5, pad_last=0)
    return model, ids, mask


@pytest.mark.parametrize("name", ["freq", "ean", "reap"])
def test_unrouted_experts_are_removed_first_and_logits_stay(name):
    model, ids, mask = _sparse_routing_case(norm_topk_prob=True)
    before = _logits(model, ids, mask)
    stats = _ctx(model, ids, mask, 0.0, name).stats()
    unrouted = {i: set(torch.nonzero(s.count == 0).flatten().tolist()) for i, s in stats.items()}
    n_drop = min(len(u) for u in unrouted.values())
    assert n_drop >= 2, "test precondition: every layer has unrouted experts"
    plan = get_method(name).plan(_ctx(model, ids, mask, n_drop / 16, name))
    for lp in plan.layers:
        assert len(lp.removed) == n_drop and set(lp.removed) <= unrouted[lp.layer]
    apply_plan(model, plan)
    assert all(l.num_experts == 16 - n_drop for l in moe_layers(model))
    # top-k weights renormalised over the same surviving experts: identical routing, the same logits up to
    # rounding (a softmax over fewer experts, a smaller router matmul, in every layer)
    assert_f32_close(_logits(model, ids, mask), before, model.config.hidden_size, model.config.num_hidden_layers + 1)


def test_without_renormalisation_removing_unrouted_experts_changes_logits():
    """The flip side (so the test above can fail): the full softmax shifts when experts leave it."""
    model, ids, mask = _sparse_routing_case(norm_topk_prob=False)
    before = _logits(model, ids, mask)
    plan = get_method("reap").plan(_ctx(model, ids, mask, 2 / 16, "reap"))
    apply_plan(model, plan)
    atol = f32_atol(before, model.config.hidden_size, model.config.num_hidden_layers + 1)  # as in the test above
    assert not torch.allclose(_logits(model, ids, mask), before, rtol=0, atol=atol)


def test_reap_keeps_the_highest_scores():
    model = tiny_model("mixtral", num_experts=8, top_k=2)
    ids, mask = tiny_batch(batch=6, seq=16)
    plan = get_method("reap").plan(_ctx(model, ids, mask, 0.5, "reap"))
    for lp in plan.layers:
        s = torch.tensor(lp.saliency)
        kept, removed = s[lp.keep], s[lp.removed]
        assert len(lp.keep) == 4 and kept.min() >= removed.max()
        assert lp.scores["reap"] == lp.saliency


def test_random_is_seeded():
    model = tiny_model("olmoe")
    ids, mask = tiny_batch()
    a = get_method("random").plan(Context(model, None, 0.5, {"name": "random", "seed": 1}))
    b = get_method("random").plan(Context(model, None, 0.5, {"name": "random", "seed": 1}))
    c = get_method("random").plan(Context(model, None, 0.5, {"name": "random", "seed": 2}))
    assert [l.keep for l in a.layers] == [l.keep for l in b.layers] != [l.keep for l in c.layers]
