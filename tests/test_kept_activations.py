"""The alignment activations kept from the observing pass (docs/algorithms.md, REAM 4): used only where they are the
bits computed again, so every plan is the one without them, whatever the budget; the rest computed, a mismatch refused.

Whether a BLAS gives a token's row the same bits in products of different row counts depends on the library and the
shapes (at these tiny shapes MKL often does not); one calibration batch makes the observing pass's product the
alignment's own, so the tests that need the rows kept run on one batch."""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.merging_helpers import method_cfg, planned_copy

from ream_exp.methods import merging, observation
from ream_exp.methods.observation import (ALIGN_CACHE_CPU_MB, DENSE_BLOCK, DENSE_BYTES, GPU_BLOCK_SHARE,
                                          KeptActivations, Needs, kept_activation_bytes, work_block)
from ream_exp.methods.observation_cache import observation_cache
from ream_exp.moe import expert_hidden
from ream_exp.moe.tiny import tiny_batch, tiny_model

EXPERTS = 16


@pytest.fixture(scope="module", params=[16, 48], ids=["cdist-width", "product-width"])
def model(request):
    """Tiny Qwen3-MoE whose expert width takes torch.cdist's direct form (16) or its matrix-product form (48)."""
    return tiny_model("qwen3_moe", num_experts=EXPERTS, top_k=4, layers=2, width=request.param, seed=1)


@pytest.fixture(scope="module")
def batch():
    return tiny_batch(batch=6, seq=16, seed=3)


@pytest.fixture
def kept(monkeypatch):
    """Per layer, how many experts' products the alignment receives (None: recomputed) and whether the activations
    it makes of them are each expert's computed again on the alignment tokens (before the layer is merged)."""
    seen = []
    result = KeptActivations.result

    def spy(self, experts, x):
        out = result(self, experts, x)
        n = None if out is None else out.count
        same = n is not None and all(torch.equal(merging._hidden(experts, e, x, out), expert_hidden(experts, e, x))
                                     for e in range(n))
        seen.append((n, same))
        return out

    monkeypatch.setattr(KeptActivations, "result", spy)
    return seen


def _plan(model, batch, *overrides, batch_size=2):
    cfg = method_cfg("ream_official", "method.group_size=4", *overrides)
    return planned_copy(model, cfg, *batch, ratio=0.5, batch_size=batch_size)[1]


def _same_plans(a, b):
    assert a.layers == b.layers
    assert any(lp.perms for lp in a.layers)


def test_one_batch_keeps_every_experts_bits(model, batch, kept):
    plan = _plan(model, batch, batch_size=6)
    assert kept == [(EXPERTS, True)] * 2  # one per MoE layer
    kept.clear()
    _same_plans(plan, _plan(model, batch, "method.align_cache_mb=0", batch_size=6))
    assert kept == []  # nothing kept at all


@pytest.mark.parametrize("sample", [["method.align_tokens=40"], [], ["method.sim_tokens=60", "method.align_tokens=40"]],
                         ids=["align-sample", "every-token", "both-samples"])
def test_kept_activations_are_the_recomputed_bits_and_leave_the_plan(model, batch, kept, sample):
    plan = _plan(model, batch, *sample)
    assert len(kept) == 2
    assert all(n is None or same for n, same in kept)  # used only where they give the bits
    _same_plans(plan, _plan(model, batch, *sample, "method.align_cache_mb=0"))


def test_a_budget_for_some_experts_computes_only_the_others(model, batch, kept, monkeypatch):
    reference = _plan(model, batch, "method.align_cache_mb=0", batch_size=6)
    width = model.config.moe_intermediate_size
    tokens = int(batch[1].sum())
    monkeypatch.setattr(observation, "kept_activation_bytes", lambda mb, device: 5 * tokens * 2 * width * 4)
    computed = []
    products = merging.experts_products  # the alignment's one way to compute activations

    def counted(ex, x, which, out=None):
        computed.extend(range(which.start, which.stop) if isinstance(which, slice) else which)
        return products(ex, x, which, out=out)

    monkeypatch.setattr(merging, "experts_products", counted)
    plan = _plan(model, batch, batch_size=6)
    assert kept == [(5, True)] * 2
    assert computed and min(computed) >= 5
    _same_plans(plan, reference)


def test_kept_rows_that_differ_are_computed_again(model, batch, monkeypatch):
    reference = _plan(model, batch, "method.align_cache_mb=0", batch_size=6)
    results = []
    result = KeptActivations.result

    def perturbed(self, experts, x):
        self.blocks[0][0][0, 0, 0] += 1e-3
        results.append(result(self, experts, x))
        return results[-1]

    monkeypatch.setattr(KeptActivations, "result", perturbed)
    _same_plans(_plan(model, batch, batch_size=6), reference)
    assert results == [None, None]


@pytest.mark.parametrize("sample", [[], ["method.align_tokens=40"]], ids=["every-token", "align-sample"])
def test_blocks_of_alignment_tokens_are_kept_where_they_are_computed(model, batch, kept, monkeypatch, sample):
    """Every expert kept: a dense block whose tokens are all alignment tokens is written straight into the kept
    products (no copy); one with other tokens too has its aligned rows copied. The plan is the one without them."""
    reference = _plan(model, batch, *sample, "method.align_cache_mb=0")
    added, add = [], KeptActivations.add
    monkeypatch.setattr(KeptActivations, "add", lambda self, *a, direct=False: added.append(direct) or
                        add(self, *a, direct=direct))
    _same_plans(_plan(model, batch, *sample), reference)
    assert kept == [(EXPERTS, True)] * 2
    assert all(added) if not sample else not any(added)


def test_nothing_is_kept_when_alignment_tokens_are_not_all_similarity_tokens(model, batch, kept):
    _plan(model, batch, "method.sim_tokens=20", "method.align_tokens=40")
    assert kept == []


def test_the_budget_is_the_setting_or_a_share_of_the_free_memory(monkeypatch):
    assert kept_activation_bytes(None, "cpu") == ALIGN_CACHE_CPU_MB << 20
    assert kept_activation_bytes(64, "cpu") == 64 << 20
    assert kept_activation_bytes(0, "cuda") == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    assert kept_activation_bytes(None, "cuda:0") == 2 << 30
    assert kept_activation_bytes(16, "cuda:0") == 16 << 20


def test_the_budget_leaves_the_observation_cache_key_and_is_never_saved(tmp_path):
    ctx = SimpleNamespace(stats_path=tmp_path / "stats.pt", seed=0)
    layers = [SimpleNamespace(index=0)]
    keys = {mb: observation_cache(ctx, Needs(dense="gated", align=True, align_cache_mb=mb), layers)[0]
            for mb in (None, 0, 512)}
    assert len(set(keys.values())) == 1
    assert {"align_keep", "align_hidden"} <= set(observation.NOT_SAVED)
    assert isinstance(keys[None], Path)


def test_blocks_of_work_follow_the_free_gpu_memory_and_stay_constant_on_a_cpu(monkeypatch):
    assert work_block("cpu", DENSE_BLOCK, DENSE_BYTES) == DENSE_BLOCK
    free = 64 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    assert work_block("cuda:0", DENSE_BLOCK, DENSE_BYTES) == free // GPU_BLOCK_SHARE // DENSE_BYTES
    free = 1 << 20  # a nearly full card: never below the CPU's block
    assert work_block("cuda", DENSE_BLOCK, DENSE_BYTES) == DENSE_BLOCK


def test_the_dense_block_is_the_layers_and_leaves_the_plan(model, batch, monkeypatch):
    """A smaller dense block (more blocks per batch, as a GPU with little free memory gets) keeps the same rows:
    the kept products fill across block edges and the plan is the one without them."""
    reference = _plan(model, batch, "method.align_cache_mb=0", "method.align_tokens=40")
    blocks = []
    monkeypatch.setattr(observation, "work_block", lambda device, elements, size: blocks.append(elements) or
                        EXPERTS * 2 * model.config.moe_intermediate_size * 5)  # 5 tokens per block
    _same_plans(_plan(model, batch, "method.align_tokens=40"), reference)
    assert blocks == [DENSE_BLOCK] * 2


def test_kept_products_are_released_before_the_pca(model, batch, monkeypatch):
    """The PCA's float32 copy of the layer and the kept products are never alive together (the streamed peak)."""
    alive = []
    pca, result = merging.pca_weight_features, KeptActivations.result
    refs = []

    def watched(self, experts, x):
        out = result(self, experts, x)
        refs.append(weakref.ref(out.blocks[0][0]))
        return out

    def checked(layer, dim, seed, spill=None):
        alive.append(refs[-1]() is not None)
        return pca(layer, dim, seed, spill)

    monkeypatch.setattr(KeptActivations, "result", watched)
    monkeypatch.setattr(merging, "pca_weight_features", checked)
    _plan(model, batch, batch_size=6)
    assert alive == [False, False]


@pytest.mark.parametrize("lean", [True, False], ids=["lean-pool", "plain-pool"])
def test_a_lean_pool_frees_the_kept_buffers_before_the_pca(model, batch, monkeypatch, lean):
    """A streamed run's pool (lean) holds none of the observing pass's or the alignment's buffers while the PCA copies
    the layer; an in-memory run's keeps its kept products' buffers for the next layer (and no page faults)."""
    from ream_exp.methods import layerwise, scratch

    pooled, pca = [], merging.pca_weight_features
    monkeypatch.setattr(layerwise, "scratch_buffers", lambda lean_=False, **_: scratch.scratch_buffers(lean=lean))
    monkeypatch.setattr(merging, "pca_weight_features", lambda *a: pooled.append(scratch.pooled()) or pca(*a))
    reference = _plan(model, batch, "method.align_cache_mb=0", batch_size=6)
    pooled.clear()
    _same_plans(_plan(model, batch, batch_size=6), reference)
    assert len(pooled) == 2
    if lean:
        assert pooled == [[], []]
    else:
        assert all(any(n.startswith("kept.") for n in names) for names in pooled)
