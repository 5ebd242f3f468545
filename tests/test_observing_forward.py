"""The one observing experts forward: the model's output, every routed pair to the sink, pads and "no expert"
slots never counted (for both statistics sinks), and the module's own forward chain called and restored."""

import pytest
import torch

from ream_exp.methods.observation import LayerObservation
from ream_exp.moe import moe_layers
from ream_exp.moe.tiny import tiny_model
from ream_exp.observe import LayerStats, observe, observing_experts
from tests.test_moe_families import _reference_expert

T, K = 7, 2


def _routing(n: int, seed: int = 0):
    """Top-2 indices with two "no expert" slots (index n, as expert-parallel kernels mark them), weights, pads."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=gen)[:K] for _ in range(T)])
    idx[1, 1] = idx[4, 0] = n
    weights = torch.rand(T, K, generator=gen)
    weights[1, 1] = weights[4, 0] = 0.0  # a sentinel slot carries no weight (what the kernels assume)
    valid = torch.ones(T, dtype=torch.bool)
    valid[[2, 5]] = False
    return idx, weights, valid


def _brute_force(layer, x, idx, weights, valid, sigma):
    n = layer.num_experts
    count, reap, sigma_reap, ean = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if not valid[t] or e >= n:
                continue
            with torch.no_grad():
                norm = float(_reference_expert(layer, e, x[t:t + 1]).double().norm())
            count[e] += 1
            ean[e] += norm
            reap[e] += float(weights[t, k]) * norm
            sigma_reap[e] += float(sigma[t, e]) * norm
    return count, ean, reap, sigma_reap


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_routed_pairs_reach_both_sinks_without_pads_or_no_expert_slots(impl):
    model = tiny_model("qwen3_moe")
    model.config._experts_implementation = impl
    layer = moe_layers(model)[0]
    layer.experts._is_expert_parallel = True  # the fused kernels honour "no expert" slots only then
    n, x = layer.num_experts, torch.randn(T, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    idx, weights, valid = _routing(n)
    sigma = torch.softmax(torch.randn(T, n, generator=torch.Generator().manual_seed(2)), dim=-1)
    stats, obs = LayerStats(n), LayerObservation(n)

    def both(routed):
        stats.add(routed)
        obs.add_routed(routed, sigma[routed.row, routed.expert])

    with torch.no_grad():
        plain = layer.experts(x, idx, weights)
        with observing_experts(layer.experts, n, both, lambda: valid):
            seen = layer.experts(x, idx, weights)
    # top-2 sums in another order and matmuls over other row blocks: float32 rounding of ~H terms
    torch.testing.assert_close(seen, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    stats.finish()
    count, ean, reap, sigma_reap = _brute_force(layer, x, idx, weights, valid, sigma)
    assert stats.tokens == int(valid.sum())
    assert torch.equal(stats.count, count) and torch.equal(obs.count, count)
    close = dict(rtol=1e-5, atol=1e-8)  # float64 sums of float32 outputs from another kernel
    torch.testing.assert_close(stats.ean, ean, **close)
    torch.testing.assert_close(stats.reap, reap, **close)
    torch.testing.assert_close(obs.reap, reap, **close)
    torch.testing.assert_close(obs.sigma_reap, sigma_reap, **close)
    assert "forward" not in layer.experts.__dict__


def test_an_instance_forward_is_called_through_and_restored():
    """A wrapper installed as instance `forward` (as accelerate's hooks are) runs during observation and is
    the very same object afterwards."""
    model = tiny_model("qwen3_moe")
    calls = []
    wrappers = {}
    for layer in moe_layers(model):
        def wrapper(*args, _experts=layer.experts, _index=layer.index):
            calls.append(_index)
            return type(_experts).forward(_experts, *args)
        layer.experts.forward = wrappers[layer.index] = wrapper
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    stats = observe(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert sorted(set(calls)) == sorted(stats) == [0, 2]
    assert all(layer.experts.__dict__["forward"] is wrappers[layer.index] for layer in moe_layers(model))
    assert all(s.tokens == ids.numel() and isinstance(s.tokens, int) for s in stats.values())
