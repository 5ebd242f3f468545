"""Reused working buffers (ream_exp/methods/scratch.py): one buffer per name inside the block, fresh tensors
outside it and on other devices, and a layer-wise run whose results do not depend on where its memory comes from."""

import torch

from ream_exp.methods import scratch as scratch_module
from ream_exp.methods.scratch import scratch, scratch_buffers
from ream_exp.moe import experts_products, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model


def test_a_name_reuses_its_buffer_inside_the_block_and_grows_it():
    with scratch_buffers():
        a = scratch("x", (4, 8), torch.float32, "cpu")
        b = scratch("x", (2, 8), torch.float32, "cpu")  # smaller: the same memory
        assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
        other = scratch("y", (4, 8), torch.float32, "cpu")
        assert other.data_ptr() != a.data_ptr()
        bigger = scratch("x", (8, 8), torch.float32, "cpu")  # grown: a new buffer of the larger size
        assert bigger.shape == (8, 8) and scratch("x", (8, 8), torch.float32, "cpu").data_ptr() == bigger.data_ptr()
        assert scratch("x", (8, 8), torch.float64, "cpu").dtype == torch.float64  # another dtype: reallocated
        with scratch_buffers():  # nested: the outer pool serves
            assert scratch("y", (4, 8), torch.float32, "cpu").data_ptr() == other.data_ptr()
    assert scratch_module._POOL.get() is None
    first, second = scratch("x", (4, 8), torch.float32, "cpu"), scratch("x", (4, 8), torch.float32, "cpu")
    assert first.data_ptr() != second.data_ptr()  # outside the block every call is a new tensor


def test_products_written_into_reused_buffers_are_the_fresh_products():
    torch.manual_seed(0)
    layer = moe_layers(tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1).eval())[0]
    x = torch.randn(37, layer.experts.gate_up_proj.shape[-1])
    fresh = experts_products(layer.experts, x)
    with scratch_buffers():
        garbage = scratch("p.0", (8, 64, 64), torch.float32, "cpu").fill_(float("nan"))
        scratch("p.1", (8, 64, 64), torch.float32, "cpu").fill_(float("nan"))
        reused = experts_products(layer.experts, x, out=lambda p, shape: scratch(f"p.{p}", shape, x.dtype, x.device))
        assert reused[0].data_ptr() == garbage.data_ptr()
        assert all(torch.equal(f, r) for f, r in zip(fresh, reused))


def test_a_layerwise_run_gives_the_same_plan_with_and_without_reused_buffers(monkeypatch):
    """ream_official on a tiny model, three batches (buffers reused across batches and layers), against the same
    run with every scratch call a fresh tensor."""
    from ream_exp.methods import Context, get_method
    from tests.merging_helpers import method_cfg

    ids, mask = tiny_batch(batch=6, seq=16)

    def plan():
        model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).eval()
        ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, method_cfg("ream_official"),
                      batch_size=2, progress=False)
        return get_method("ream_official").plan(ctx).layers

    reused = plan()
    monkeypatch.setattr(scratch_module, "scratch_buffers", _no_pool)
    monkeypatch.setattr("ream_exp.methods.layerwise.scratch_buffers", _no_pool)
    assert plan() == reused


def _no_pool(lean: bool = False):
    import contextlib

    return contextlib.nullcontext()


def test_a_lean_pool_frees_what_is_spent_and_a_plain_pool_keeps_it():
    from ream_exp.methods.scratch import pooled, spent

    for lean in (True, False):
        with scratch_buffers(lean=lean):
            scratch("kept.0", (4,), torch.float32, "cpu")
            scratch("dense.0", (4,), torch.float32, "cpu")
            spent("kept.")
            assert pooled() == (["dense.0"] if lean else ["dense.0", "kept.0"])
    assert pooled() == []


def test_the_activation_out_of_place_is_the_in_place_activations_bits():
    """moe.activated_into (the dense pass's, when its products are kept) against moe.activated, for SiLU and another
    activation, on shapes whose sizes are no multiple of a vector width, on one and two threads."""
    from torch import nn

    from ream_exp.moe import activated, activated_into

    experts = moe_layers(tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=1).eval())[0].experts
    threads = torch.get_num_threads()
    try:
        for act in (experts.act_fn, nn.GELU()):
            experts.act_fn = act
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                for shape in [(8, 1001, 77), (3, 5, 13), (64, 512, 128)]:
                    gate, up = torch.randn(shape) * 4, torch.randn(shape)
                    kept = (gate.clone(), up.clone())
                    out = activated_into(experts, kept, lambda s: torch.empty(s))
                    assert torch.equal(kept[0], gate) and torch.equal(kept[1], up)  # left as they were
                    assert torch.equal(out, activated(experts, (gate.clone(), up.clone())))
    finally:
        torch.set_num_threads(threads)


def test_the_pca_features_are_a_pooled_buffer_a_lean_pool_frees(monkeypatch):
    """pca_weight_features builds the layer's weight features in the buffer "pca.features": a plain pool keeps it
    for the next layer (the same memory), a lean pool frees it once the PCA is done; the features are the same
    bits wherever they live (z equal to the unpooled PCA's, whatever the buffer held before)."""
    from ream_exp.methods import merging
    from ream_exp.methods.scratch import pooled

    torch.manual_seed(0)
    layers = moe_layers(tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=2).eval())
    with torch.no_grad():
        fresh = [merging.pca_weight_features(layer, 8, 0) for layer in layers]
    built, layer_features = [], merging.layer_features

    def spy(*args):
        feats = layer_features(*args)
        built.append(feats.data_ptr())
        return feats

    monkeypatch.setattr(merging, "layer_features", spy)
    for lean in (False, True):
        built.clear()
        with scratch_buffers(lean=lean), torch.no_grad():
            scratch("pca.features", (4096,), torch.float32, "cpu").fill_(float("nan"))  # stale contents
            z = [merging.pca_weight_features(layer, 8, 0) for layer in layers]
            assert pooled() == ([] if lean else ["pca.features"])
        assert all(torch.equal(a, b) for a, b in zip(z, fresh))
        if not lean:  # the second layer's features in the first one's memory (a lean pool's may reuse it by chance)
            assert built[0] == built[1]
