"""Observation statistics equal a brute-force per-token reference, and observing changes no output."""

import pytest
import torch

from ream_exp.moe import moe_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.observe import observe, observing
from tests.test_moe_families import _reference_expert
from tests.tolerances import assert_f32_close


def _block_inputs(model, ids, mask):
    """Hidden states entering each MoE block, captured with forward pre-hooks during a plain forward."""
    seen = {}
    hooks = [l.block.register_forward_pre_hook(lambda m, a, i=l.index: seen.__setitem__(i, a[0].detach()))
             for l in moe_layers(model)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return seen


def _brute_force(model, ids, mask):
    """Per layer: freq, soft_freq, ean, reap from plain loops over every non-pad token and top-k slot."""
    inputs, valid = _block_inputs(model, ids, mask), mask.reshape(-1).bool()
    out = {}
    for layer in moe_layers(model):
        h = inputs[layer.index].reshape(-1, model.config.hidden_size)
        with torch.no_grad():
            _, weights, index = layer.router(h)
        n = layer.num_experts
        count, soft, ean, reap = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
        for t in range(h.shape[0]):
            if not valid[t]:
                continue
            for k in range(index.shape[1]):
                e, w = int(index[t, k]), float(weights[t, k])
                norm = float(_reference_expert(layer, e, h[t:t + 1]).norm())
                count[e] += 1
                soft[e] += w
                ean[e] += norm
                reap[e] += w * norm
        reap_mean = torch.where(count > 0, reap / count.clamp(min=1), 0.0)
        out[layer.index] = {"freq": count / valid.sum(), "soft_freq": soft, "ean": ean, "reap": reap_mean}
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scores_match_brute_force(family):
    model = tiny_model(family)
    ids, mask = tiny_batch(batch=4, seq=12)
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    stats = observe(model, batches, progress=False)
    ref = _brute_force(model, ids, mask)
    # float32 model vs float64 reference; the block inputs went through up to every decoder layer
    stages = model.config.num_hidden_layers + 1
    for index, want in ref.items():
        s = stats[index]
        assert s.tokens == int(mask.sum())
        for name, value in want.items():
            assert_f32_close(s.score(name).cpu(), value, model.config.hidden_size, stages,
                             msg=f"{family} {index} {name}")
        assert (want["reap"][s.count == 0] == 0).all()


def test_pads_never_count():
    model = tiny_model("qwen3_moe")
    ids, mask = tiny_batch(batch=2, seq=10, pad_last=4)
    stats = observe(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    padded = observe(model, [{"input_ids": ids[:1], "attention_mask": mask[:1]},
                             {"input_ids": ids[1:, :6], "attention_mask": mask[1:, :6]}], progress=False)
    for i in stats:
        assert stats[i].tokens == 16
        torch.testing.assert_close(stats[i].count, padded[i].count)
        # another batch shape: attention and matmuls may block the same sums differently
        assert_f32_close(stats[i].reap_score, padded[i].reap_score, model.config.hidden_size,
                         model.config.num_hidden_layers + 1)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_observing_leaves_outputs_unchanged(family, impl):
    model = tiny_model(family)
    model.config._experts_implementation = impl
    ids, mask = tiny_batch()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with observing(model) as (_, token_mask):
            token_mask.value = mask.reshape(-1).bool()
            seen = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    # same experts, same weights; only the order of the top-k sums differs, in every decoder layer and
    # the LM head (a few units of the last place of the logits; 1.1e-6 seen on an AMD EPYC)
    assert_f32_close(seen, plain, model.config.hidden_size, model.config.num_hidden_layers + 1)
    assert torch.equal(plain, after)
    assert all("forward" not in l.experts.__dict__ for l in moe_layers(model))
