"""Both statistics caches (pruning stats, per-layer observations) rebuild a damaged entry, never fail on it, and
recompute, with one log line saying why, an entry made by another version of the code that computes it."""

import copy
import logging

import pytest
import torch

import ream_exp.methods.layerwise as layerwise
import ream_exp.methods.observation as observation
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
    for entry in (state["layers"].values() if "count" not in state else [state]):
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


# ---- an entry made by other code is recomputed, with one log line saying what differed -------------------

def _observed(monkeypatch, module, name):
    """Counts the calls of `module.name` (the function that computes the cache's content)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _stale_lines(caplog, cache):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(cache)]


def test_pruning_stats_from_another_observe_version_are_recomputed(model, tmp_path, monkeypatch, caplog):
    import ream_exp.methods.base as base
    import ream_exp.observe as observe

    path = tmp_path / "stats" / "key.pt"
    path.parent.mkdir()
    _ctx(model, "reap", path).stats()
    assert torch.load(path, weights_only=True)["made_by"]["observe code"] == observe.STATS_VERSION
    calls = _observed(monkeypatch, base, "observe")
    caplog.set_level(logging.INFO, logger="ream_exp")
    _ctx(model, "reap", path).stats()
    assert calls == [] and _stale_lines(caplog, "stats cache") == [], "an unchanged version is reused"

    old = observe.STATS_VERSION
    monkeypatch.setattr(observe, "STATS_VERSION", old + 1)
    _ctx(model, "reap", path).stats()
    assert calls == [1], "the entry of the old version was used"
    assert _stale_lines(caplog, "stats cache") == [
        f"stats cache {path} was made by observe code v{old}, this is v{old + 1}: recomputing"]
    assert torch.load(path, weights_only=True)["made_by"]["observe code"] == old + 1  # rewritten with the new record
    _ctx(model, "reap", path).stats()
    assert calls == [1] and len(_stale_lines(caplog, "stats cache")) == 1


def test_pruning_stats_without_a_record_are_recomputed(model, tmp_path, monkeypatch, caplog):
    """An entry from before entries recorded what made them ({layer: state}) is of an unknown version."""
    import ream_exp.methods.base as base
    import ream_exp.observe as observe

    path = tmp_path / "key.pt"
    stats = _ctx(model, "reap", None).stats()
    torch.save({i: s.state() for i, s in stats.items()}, path)  # the layout before records
    calls = _observed(monkeypatch, base, "observe")
    with caplog.at_level(logging.WARNING, logger="ream_exp"):
        _ctx(model, "reap", path).stats()
    assert calls == [1] and _stale_lines(caplog, "stats cache") == [
        f"stats cache {path} was made by an unknown version (no record of what made it), "
        f"this is observe code v{observe.STATS_VERSION}: recomputing"]
    assert "made_by" in torch.load(path, weights_only=True)


@pytest.mark.parametrize("constant", ["OBSERVATION_VERSION", "STATS_VERSION"])
def test_layer_observations_from_another_version_are_recomputed(constant, model, tmp_path, monkeypatch, caplog):
    """Per-layer observations record both the observing forward's version (observe.py) and the
    LayerObservation code's (methods/observation.py): a change of either recomputes every layer, with one
    log line."""
    import ream_exp.observe as observe

    path = tmp_path / "stats" / "key.pt"
    plan = lambda: get_method("hc_smoe").plan(_ctx(model, "hc_smoe", path))  # noqa: E731
    plan()
    observed = _observed(monkeypatch, layerwise, "observe_layer")
    caplog.set_level(logging.INFO, logger="ream_exp")
    plan()
    assert observed == [] and _stale_lines(caplog, "observation cache") == [], "an unchanged version is reused"

    module, label = (observation, "observation") if constant == "OBSERVATION_VERSION" else (observe, "observe")
    old = getattr(module, constant)
    monkeypatch.setattr(module, constant, old + 1)
    plan()
    assert len(observed) == 2, "every MoE layer is observed again"
    first = sorted(path.parent.glob("key-layers-*.pt"))[0]
    assert _stale_lines(caplog, "observation cache") == [
        f"observation cache {first} was made by {label} code v{old}, this is v{old + 1}: recomputing"]
    for entry in path.parent.glob("key-layers-*.pt"):
        assert torch.load(entry, weights_only=True)["made_by"][f"{label} code"] == old + 1
    plan()
    assert len(observed) == 2 and len(_stale_lines(caplog, "observation cache")) == 1
