"""Both statistics caches (pruning stats, per-layer observations) rebuild a damaged entry, never fail on it."""

import copy

import pytest
import torch

import ream_exp.methods.layerwise as layerwise
from ream_exp.methods import Context, get_method
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.observe import load_stats, save_stats
from tests.merging_helpers import method_cfg


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_moe", num_experts=8, top_k=2)


def _ctx(model, method: str, stats_path, *overrides):
    ids, mask = tiny_batch(batch=4, seq=12)
    return Context(copy.deepcopy(model), {"input_ids": ids, "attention_mask": mask}, 0.5,
                   method_cfg(method, *overrides), batch_size=2, progress=False, stats_path=stats_path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_a_key(path):
    state = torch.load(path, weights_only=True)
    for entry in (state.values() if "count" not in state else [state]):
        entry.pop("count")
    torch.save(state, path)


@pytest.mark.parametrize("damage", [_truncate, _drop_a_key])
def test_damaged_pruning_stats_are_rebuilt(damage, model, tmp_path):
    path = tmp_path / "stats" / "key.pt"
    path.parent.mkdir()
    fresh = _ctx(model, "reap", path).stats()
    damage(path)
    with pytest.raises(Exception):
        load_stats(path)  # the damage is real
    with pytest.warns(UserWarning, match="unreadable statistics cache"):
        rebuilt = _ctx(model, "reap", path).stats()
    for i in fresh:
        assert rebuilt[i].tokens == fresh[i].tokens
        torch.testing.assert_close(rebuilt[i].reap_score, fresh[i].reap_score, rtol=0, atol=0)
    assert sorted(load_stats(path)) == sorted(fresh)  # rewritten whole


def test_saved_pruning_stats_round_trip(model, tmp_path):
    stats = _ctx(model, "reap", None).stats()
    save_stats(stats, tmp_path / "s.pt")
    loaded = load_stats(tmp_path / "s.pt")
    for i in stats:
        assert loaded[i].tokens == stats[i].tokens
        for name in ("freq", "soft_freq", "ean", "reap"):
            assert torch.equal(loaded[i].score(name), stats[i].score(name))


@pytest.mark.parametrize("damage", [_truncate, _drop_a_key])
@pytest.mark.parametrize("method", ["hc_smoe", "ream_nonseq"])
def test_damaged_layer_observations_are_rebuilt(method, damage, model, tmp_path, monkeypatch):
    overrides = ("method.group_size=4",) if method == "ream_nonseq" else ()
    path = tmp_path / "stats" / "key.pt"
    fresh = get_method(method_cfg(method)["name"]).plan(_ctx(model, method, path, *overrides))
    entries = sorted(path.parent.glob("key-layers-*.pt"))
    assert len(entries) == 2  # one per MoE layer (layer 1 is dense)
    damage(entries[-1])
    observed = []
    real = layerwise.observe_layer
    monkeypatch.setattr(layerwise, "observe_layer", lambda *a, **k: observed.append(a[1].index) or real(*a, **k))
    with pytest.warns(UserWarning, match="unreadable statistics cache"):
        again = get_method(method_cfg(method)["name"]).plan(_ctx(model, method, path, *overrides))
    assert observed == [0, 2], "the damaged entry was not recomputed"
    for a, b in zip(fresh.layers, again.layers):
        assert (a.keep, a.groups) == (b.keep, b.groups)
        assert a.merge_weights == b.merge_weights
    observed.clear()
    get_method(method_cfg(method)["name"]).plan(_ctx(model, method, path, *overrides))
    assert observed == [], "the rebuilt entries were not used"
