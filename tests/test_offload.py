"""A model loaded through accelerate with a device map and disk offload compresses as a plain load does.

Decoder layers 0 and 3 (MoE) go to "disk", 1 (dense) and 2 (MoE) to "cpu": accelerate then keeps the
disk layers' weights on the meta device and installs an instance-`forward` hook on every module with
weights, which loads them for each forward. Observation, pruning and REAM must see the real weights,
write their results where the hook (and save_pretrained) finds them, and leave every hook in place.
"""

import pytest
import torch
import transformers as tf

from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.observe import observe
from tests.merging_helpers import method_cfg

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
              "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
              "lm_head": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_offload")
    tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=4).save_pretrained(path)
    return path


def _plain(checkpoint):
    return tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def _offloaded(checkpoint, tmp_path):
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map=DEVICE_MAP,
                                                    offload_folder=str(tmp_path / "offload")).eval()
    assert moe_layers(model)[0].experts.gate_up_proj.device.type == "meta", "layer 0 is not disk-offloaded"
    return model


def _hooks(model) -> list:
    """The hook and instance forward of every module with own weights in the MoE blocks (identity matters)."""
    found = []
    for layer in moe_layers(model):
        for module in (layer.experts, layer.router):
            found.append((module._hf_hook, module.__dict__["forward"]))
    return found


def _assert_hooks_kept(model, before):
    assert all(a is b and f is g for (a, f), (b, g) in zip(_hooks(model), before)), "a hook was replaced or lost"
    disk = [l for l in moe_layers(model) if DEVICE_MAP[f"model.layers.{l.index}"] == "disk"]
    assert all(p.device.type == "meta" for l in disk for p in l.experts.parameters()), "offloaded weights stayed"


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _compress(model, method: str, ids, mask, *overrides):
    cfg = method_cfg(method, *overrides)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, cfg, batch_size=2, progress=False)
    plan = get_method(cfg["name"]).plan(ctx)
    apply_plan(model, plan)
    return plan


# Both loads run the same float32 operations on the same values on this CPU; only the layout of the
# tensors read back from the offload folder may differ, so allow a few float32 ulps of the results.
CLOSE = dict(rtol=1e-6, atol=1e-7)


def test_observation_equals_a_plain_load_and_keeps_the_hooks(checkpoint, tmp_path):
    ids, mask = tiny_batch(batch=4, seq=12)
    plain, offloaded = _plain(checkpoint), _offloaded(checkpoint, tmp_path)
    hooks = _hooks(offloaded)
    torch.testing.assert_close(_logits(offloaded, ids, mask), _logits(plain, ids, mask), **CLOSE)
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    want, got = observe(plain, batches, progress=False), observe(offloaded, batches, progress=False)
    assert sorted(got) == sorted(want) == [0, 2, 3]
    for i in want:
        assert got[i].tokens == want[i].tokens == int(mask.sum())
        assert torch.equal(got[i].count, want[i].count)
        for name in ("freq", "soft_freq", "ean", "reap"):
            torch.testing.assert_close(got[i].score(name), want[i].score(name), **CLOSE)
    _assert_hooks_kept(offloaded, hooks)
    torch.testing.assert_close(_logits(offloaded, ids, mask), _logits(plain, ids, mask), **CLOSE)


@pytest.mark.parametrize("method", ["reap", "ream_official", "m_smoe"])
def test_compression_equals_a_plain_load_and_keeps_the_hooks(method, checkpoint, tmp_path):
    ids, mask = tiny_batch(batch=4, seq=12)
    plain, offloaded = _plain(checkpoint), _offloaded(checkpoint, tmp_path)
    hooks = _hooks(offloaded)
    want, got = _compress(plain, method, ids, mask), _compress(offloaded, method, ids, mask)
    for w, g in zip(want.layers, got.layers):
        assert (g.layer, g.keep, g.groups) == (w.layer, w.keep, w.groups)
        torch.testing.assert_close(torch.tensor(g.saliency), torch.tensor(w.saliency), **CLOSE)
        if w.merge_weights is not None:
            torch.testing.assert_close(torch.tensor(sum(g.merge_weights, [])), torch.tensor(sum(w.merge_weights, [])),
                                       **CLOSE)
    assert all(l.num_experts == 4 for l in moe_layers(offloaded))
    _assert_hooks_kept(offloaded, hooks)
    # the merged and sliced weights are where the hooks load them from: same model, same logits
    torch.testing.assert_close(_logits(offloaded, ids, mask), _logits(plain, ids, mask), **CLOSE)
    # and where save_pretrained reads offloaded weights: the checkpoint reloads as the plain compressed model
    offloaded.save_pretrained(tmp_path / "compressed")
    reloaded = _plain(tmp_path / "compressed")
    torch.testing.assert_close(_logits(reloaded, ids, mask), _logits(plain, ids, mask), **CLOSE)


# ---- whole runs: run(cfg) with model.device_map / max_memory / offload_folder --------------------------

# conftest's tiny_checkpoint: decoder layers 0 and 2 are MoE, 1 is dense
RUN_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
           "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def _run_cfg(tiny_checkpoint, calib_files, tmp_path, method, *extra):
    from tests.test_config import make_cfg

    return make_cfg("model=local", f"model.path={tiny_checkpoint}", "calib=local", "calib.n=12", "calib.seq_len=24",
                    *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()], "calib.batch_size=4",
                    f"method={method}", "ratio=0.5", "eval=none", "logger=none", "progress=false",
                    f"cache_dir={tmp_path / 'cache'}", *extra)


def _run_outputs(cfg, run_dir):
    from safetensors.torch import load_file

    from ream_exp.plan import Plan
    from ream_exp.run import run

    run(cfg, run_dir)
    weights = {}
    for shard in sorted((run_dir / "checkpoint").glob("*.safetensors")):
        weights.update(load_file(shard))
    return Plan.load(run_dir / "plan.json"), weights


def _assert_same_run(got, want):
    (plan, weights), (want_plan, want_weights) = got, want
    for g, w in zip(plan.layers, want_plan.layers, strict=True):
        assert (g.layer, g.keep, g.groups) == (w.layer, w.keep, w.groups)
        torch.testing.assert_close(torch.tensor(g.saliency), torch.tensor(w.saliency), **CLOSE)
    assert weights.keys() == want_weights.keys()
    for name in want_weights:
        torch.testing.assert_close(weights[name], want_weights[name], **CLOSE, msg=name)


@pytest.mark.parametrize("method", ["reap", "ream_official"])
def test_a_run_on_a_disk_offloading_device_map_equals_a_plain_run(method, tiny_checkpoint, calib_files, tmp_path):
    from omegaconf import OmegaConf

    want = _run_outputs(_run_cfg(tiny_checkpoint, calib_files, tmp_path / "a", method), tmp_path / "plain")
    cfg = _run_cfg(tiny_checkpoint, calib_files, tmp_path / "b", method, f"model.offload_folder={tmp_path / 'offload'}")
    cfg.model.device_map = OmegaConf.create(RUN_MAP)  # dotted module names: set here, not as an override
    _assert_same_run(_run_outputs(cfg, tmp_path / "offloaded"), want)
    assert any((tmp_path / "offload").iterdir()), "accelerate wrote no disk weights: nothing was offloaded"


def test_device_map_auto_with_max_memory_offloads_to_a_temporary_folder(tiny_checkpoint, calib_files, tmp_path,
                                                                       monkeypatch):
    """150 KB of CPU memory holds the embeddings and decoder layer 0 of the 180 KB model; the rest goes to
    disk, into a folder of the run directory that is removed when the run ends."""
    import ream_exp.run as run_module

    want = _run_outputs(_run_cfg(tiny_checkpoint, calib_files, tmp_path / "a", "reap"), tmp_path / "plain")
    maps, load = [], run_module.load_model

    def recording_load(*args):
        model = load(*args)
        maps.append(dict(model.hf_device_map))
        return model

    monkeypatch.setattr(run_module, "load_model", recording_load)
    cfg = _run_cfg(tiny_checkpoint, calib_files, tmp_path / "b", "reap", "model.device_map=auto",
                   "model.max_memory={cpu:150KB}")
    got = _run_outputs(cfg, tmp_path / "auto")
    (placed,) = maps
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    _assert_same_run(got, want)
    assert not list((tmp_path / "auto").glob("offload-*")), "the temporary offload folder was left behind"


@pytest.mark.parametrize("overrides, message", [
    (["model.max_memory={cpu:1GiB}"], "model.max_memory is set but model.device_map is null"),
    (["model.device_map=auto", "model.max_memory={gpu0:1GiB}"], "model.max_memory names device 'gpu0'"),
    (["model.device_map=auto", "model.max_memory={cpu:lots}"], "model.max_memory.cpu='lots' is not a size"),
    (["model.offload_folder=/tmp/x"], "model.offload_folder is set but model.device_map is null"),
])
def test_bad_placement_settings_fail_before_loading(overrides, message, tiny_checkpoint, calib_files, tmp_path,
                                                    monkeypatch):
    import ream_exp.run as run_module
    from ream_exp.config import ConfigError

    monkeypatch.setattr(run_module, "load_model", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message) as err:
        run_module.run(_run_cfg(tiny_checkpoint, calib_files, tmp_path, "reap", *overrides), tmp_path / "run")
    assert "\n" not in str(err.value)
