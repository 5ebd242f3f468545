"""Every supported family: find the MoE layers, read/write experts, prune, save, reload identically."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_exp.moe import (apply_plan, canonical_weights, expert_output, experts_hidden, moe_layers,
                          write_canonical_weights)
from ream_exp.moe.families import family_for
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.plan import LayerPlan, Plan
from tests.tolerances import assert_f32_close


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _reference_expert(layer, e, x):
    """E_e(x) written out from the canonical weights in float64, another way than the model's kernels."""
    w = {k: (v[0].double() if v is not None else None) for k, v in canonical_weights(layer.experts, [e]).items()}
    x = x.double()
    gate, up = x @ w["gate"].T, x @ w["up"].T
    if w["gate_bias"] is not None:
        gate, up = gate + w["gate_bias"], up + w["up_bias"]
    if layer.family.name == "gpt_oss":
        ex = layer.experts
        gate, up = gate.clamp(max=ex.limit), up.clamp(-ex.limit, ex.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
    else:
        h = torch.nn.functional.silu(gate) * up
    out = h @ w["down"].T
    return out + w["down_bias"] if w["down_bias"] is not None else out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_expert_forward_matches_model_layout(family):
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    x = torch.randn(5, model.config.hidden_size)
    for e in (0, layer.num_experts - 1):  # float32 kernel vs float64: two matmuls, the longer over H
        assert_f32_close(expert_output(layer.experts, e, x).double(), _reference_expert(layer, e, x),
                         model.config.hidden_size, stages=2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_activations_are_each_experts_own(family):
    """experts_hidden over a slice (weight views) and over a list (copies), gate and up as two products, give
    each expert's a_e(x): its down projection is the float64 reference's E_e(x)."""
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    x = torch.randn(7, model.config.hidden_size)
    every, some = experts_hidden(layer.experts, x), experts_hidden(layer.experts, x, [2, 0])
    assert every.shape == (layer.num_experts, 7, layer.intermediate_size)
    for e, hidden in ((2, some[0]), (0, some[1]), (0, every[0]), (layer.num_experts - 1, every[-1])):
        assert_f32_close(expert_output(layer.experts, e, x, hidden).double(), _reference_expert(layer, e, x),
                         model.config.hidden_size, stages=2)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_canonical_weights_round_trip(family):
    model = tiny_model(family)
    layer = moe_layers(model)[-1]
    before = {k: v.clone() for k, v in layer.experts.state_dict().items()}
    w = canonical_weights(layer.experts, [3, 1])
    write_canonical_weights(layer.experts, [1, 3], w)  # swap experts 1 and 3 ...
    write_canonical_weights(layer.experts, [3, 1], canonical_weights(layer.experts, [1, 3]))  # ... and back
    for k, v in layer.experts.state_dict().items():
        assert torch.equal(v, before[k]), k
    swapped = canonical_weights(layer.experts, [1])
    write_canonical_weights(layer.experts, [1], canonical_weights(layer.experts, [3]))
    x = torch.randn(4, model.config.hidden_size)
    torch.testing.assert_close(expert_output(layer.experts, 1, x), expert_output(layer.experts, 3, x))
    assert not torch.equal(swapped["gate"], canonical_weights(layer.experts, [1])["gate"])


def _plan(model, keep_per_layer):
    return Plan("test", 0.5, [LayerPlan(l.index, l.num_experts, keep_per_layer(l)) for l in moe_layers(model)])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pruned_checkpoint_reloads_with_identical_logits(family, tmp_path):
    model = tiny_model(family)
    ids, mask = tiny_batch()
    apply_plan(model, _plan(model, lambda l: [0, 2, 5, 7][: 4] if l.index % 2 == 0 else [1, 3, 4, 6]))
    fam = family_for(model.config.model_type)
    assert getattr(model.config, fam.count_key) == 4
    for layer in moe_layers(model):
        assert layer.num_experts == 4 and layer.router.num_experts == 4 and layer.experts.num_experts == 4
        assert layer.experts.gate_up_proj.shape[0] == 4 and layer.experts.down_proj.shape[0] == 4
    expected = _logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(reloaded.config, fam.count_key) == 4
    assert all(l.num_experts == 4 for l in moe_layers(reloaded))
    torch.testing.assert_close(_logits(reloaded, ids, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_slicing_keeps_the_chosen_experts(family):
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    keep = [1, 2, 4, 7]  # two of each half: DeepSeek-V2's tiny router has n_group = 2 groups to keep
    want = {k: v[keep].clone() for k, v in canonical_weights(layer.experts, list(range(8))).items() if v is not None}
    router = {n: t[keep].clone() for n, t in list(layer.router.named_parameters()) + list(layer.router.named_buffers())}
    apply_plan(model, _plan(model, lambda l: keep))
    got = canonical_weights(layer.experts, list(range(4)))
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    for n, t in list(layer.router.named_parameters()) + list(layer.router.named_buffers()):
        assert torch.equal(t, router[n]), n


def test_shared_experts_and_dense_layers_untouched():
    for family, shared in (("qwen2_moe", "shared_expert"), ("deepseek_v3", "shared_experts")):
        model = tiny_model(family, layers=3)
        dense = [i for i in range(3) if i not in {l.index for l in moe_layers(model)}]
        assert dense, f"{family} tiny model should have a dense layer"
        dense_prefix = tuple(f"layers.{i}.mlp" for i in dense)
        before = {n: p.clone() for n, p in model.named_parameters() if shared in n or any(d in n for d in dense_prefix)}
        assert any(shared in n for n in before) and any(d in n for n in before for d in dense_prefix)
        apply_plan(model, _plan(model, lambda l: [0, 1, 2, 3]))
        after = dict(model.named_parameters())
        for n, p in before.items():
            assert torch.equal(after[n], p), n


def test_group_limited_routing_survives_balanced_removal():
    """Three of each router group's four experts kept, in group order: n_group and topk_group stay
    (tests/test_router_groups.py has the logits, the methods and the refusals)."""
    model = tiny_model("deepseek_v3", n_group=2, topk_group=1)
    apply_plan(model, _plan(model, lambda l: [0, 1, 2, 5, 6, 7]))
    assert model.config.n_group == 2 and model.config.topk_group == 1
    assert all(l.router.num_group == 2 and l.num_experts == 6 for l in moe_layers(model))
    ids, mask = tiny_batch()
    assert torch.isfinite(_logits(model, ids, mask)).all()


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="llama.*supported: .*qwen3_moe"):
        family_for("llama")
