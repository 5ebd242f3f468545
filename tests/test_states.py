"""Calibration hidden states on the device, in CPU memory or on disk give the same bits; statistics
are observed without computing logits.

The reference for the states is the model itself: forward hooks record every decoder layer's output
on each batch, which the stored states pushed layer by layer must reproduce. The reference for the
plans is the default placement (states_device null): cpu and disk must equal it bit for bit, since
moving and saving tensors copies their bits and every batch meets the same operations.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ream_exp.calib import validate_calib
from ream_exp.config import ConfigError
from ream_exp.methods import Context, get_method
from ream_exp.methods.capture import _Slot, _map_leaves, advance, capture_inputs
from ream_exp.methods.states import StatesConfig, StateStore, state_store
from ream_exp.moe import apply_plan, decoder_layers
from ream_exp.moe.tiny import TINY_FAMILIES, tiny_batch, tiny_model
from ream_exp.observe import observe, observing
from ream_exp.settings import check_group
from tests.merging_helpers import method_cfg


def _batches_with_mixed_padding():
    """8 rows in batches of 3, 3, 2: batch 1 pads other rows than batch 0 (same shape, own mask),
    batch 2 is shorter (own everything)."""
    ids, mask = tiny_batch(batch=8, seq=20, pad_last=5)
    mask[4, 12:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _batches(ids, mask, size=3):
    flags = torch.ones_like(mask)
    return [{"input_ids": ids[i:i + size], "attention_mask": mask[i:i + size], "sim": flags[i:i + size],
             "align": flags[i:i + size]} for i in range(0, len(ids), size)]


def _layer_outputs(model, batch) -> list[torch.Tensor]:
    outputs, hooks = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        def grab(_m, _a, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out
        hooks.append(layer.register_forward_hook(grab))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    return [outputs[i] for i in range(len(outputs))]


@pytest.mark.parametrize("place", [None, "cpu", "disk"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_stored_states_reproduce_every_layer_of_every_batch(family, place, tmp_path):
    """GPT-OSS passes two masks (sliding and full attention), longer than its window here."""
    model = tiny_model(family, num_experts=8, top_k=2, layers=3)
    ids, mask = _batches_with_mixed_padding()
    batches = _batches(ids, mask)
    states = capture_inputs(model, batches, StateStore(place, tmp_path if place == "disk" else None))
    wanted = [_layer_outputs(model, b) for b in batches]
    for i in range(len(decoder_layers(model))):
        advance(states, model, i, i + 1)
        for s, want in zip(states, wanted):
            # the same operations on the same values as inside the model's forward
            assert torch.equal(s.load()[0], want[i]), (s.key, i)


def test_layer_arguments_equal_across_batches_are_stored_once(tmp_path):
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3)
    ids, mask = _batches_with_mixed_padding()
    store = StateStore("disk", tmp_path)
    first, second, last = capture_inputs(model, _batches(ids, mask), store)
    cos = lambda s: s.layer_args[0][1]["position_embeddings"][0]
    # the rotary tables are [1, S, D] whatever the batch size: one copy for all
    assert isinstance(cos(first), torch.Tensor) and cos(second) is cos(first) and cos(last) is cos(first)
    assert second.own_args and last.own_args and not first.own_args  # different padding: own masks
    slots = set()
    _map_leaves(second.layer_args, lambda x: slots.add(x) if isinstance(x, _Slot) else None)
    assert len(store.get(f"{second.key}-args", "cpu")) == len(slots) >= 1  # one mask for all layers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{s.key}-hidden.pt" for s in (first, second, last)] + [f"{s.key}-args.pt" for s in (second, last)])


def test_states_keep_the_model_dtype():
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3).to(torch.bfloat16)
    ids, mask = tiny_batch(batch=2, seq=8)
    flags = torch.ones_like(mask)
    batch = {"input_ids": ids, "attention_mask": mask, "sim": flags, "align": flags}
    (state,) = capture_inputs(model, [batch], StateStore("cpu"))
    hidden = state.load()[0]
    assert hidden.dtype == torch.bfloat16
    assert torch.equal(hidden, model.get_input_embeddings()(ids))



def test_batches_carry_their_token_rows_computed_on_the_host(monkeypatch):
    """Each captured batch holds the rows of its masks as index tensors (the observing sink selects with
    them, no host sync per batch and layer): the very positions boolean indexing selects, in order."""
    ids, mask = _batches_with_mixed_padding()
    batches = _batches(ids, mask)
    for b in batches:
        b["sim"] = b["sim"] * (torch.arange(b["sim"].numel()).reshape(b["sim"].shape) % 3 > 0)
        b["align"] = b["align"] * (torch.arange(b["align"].numel()).reshape(b["align"].shape) % 2 == 0)
    states = capture_inputs(tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=2), batches, StateStore("cpu"))
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("rows computed after capture"))
    for state, b in zip(states, batches):
        x = torch.randn(state.valid.numel(), 3)
        for name, key in (("valid", "attention_mask"), ("sim", "sim"), ("align", "align")):
            rows = state.rows(name)
            assert rows.dtype == torch.long and rows.device == state.valid.device
            assert torch.equal(x.index_select(0, rows), x[b[key].reshape(-1).bool()]), name

def _plan_data(plan) -> dict:
    data = plan.to_dict()
    data.get("info", {}).pop("timings", None)  # seconds, not results
    return data


def _compress(model, method, ids, mask, states: StatesConfig):
    cfg = method_cfg(method)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, cfg, batch_size=3, progress=False,
                  states=states)
    plan = get_method(cfg["name"]).plan(ctx)
    apply_plan(model, plan)
    return plan, model.state_dict()


@pytest.mark.parametrize("method", ["ream_official", "hc_smoe"])
def test_plans_and_weights_are_the_same_bits_wherever_the_states_wait(method, tmp_path):
    ids, mask = _batches_with_mixed_padding()
    runs = {}
    for name, states in {"device": StatesConfig(), "cpu": StatesConfig("cpu"),
                         "disk": StatesConfig("disk", scratch_root=str(tmp_path / "scratch")),
                         "kept": StatesConfig("disk", directory=str(tmp_path / "kept"))}.items():
        runs[name] = _compress(tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=3), method, ids, mask, states)
    plan, weights = runs.pop("device")
    for name, (other_plan, other_weights) in runs.items():
        assert _plan_data(other_plan) == _plan_data(plan), name
        assert other_weights.keys() == weights.keys()
        assert all(torch.equal(other_weights[k], weights[k]) for k in weights), name
    assert not any((tmp_path / "scratch").iterdir()), "the temporary states directory was not removed"
    assert any((tmp_path / "kept").glob("*-hidden.pt")), "a configured states_dir is kept"


def test_disk_store_keeps_tensors_in_files_and_removes_its_temporary_directory(tmp_path):
    with state_store(StatesConfig("disk", scratch_root=str(tmp_path))) as store:
        store.put("a", [torch.arange(3.0)])
        assert not store._held and torch.equal(store.get("a", "cpu")[0], torch.arange(3.0))
        directory = store.directory
        assert directory.parent == tmp_path
    assert not directory.exists()


# ---- settings ----------------------------------------------------------------------------------------

def _calib(**keys):
    return OmegaConf.create({"name": "pretokenized", "path": None, "batch_size": 8, **keys})


@pytest.mark.parametrize("keys, message", [
    ({"states_device": "gpu"}, r"calib.states_device='gpu'; valid: null, cpu, disk"),
    ({"states_device": "cpu", "states_dir": "/tmp/x"}, r"calib.states_dir='/tmp/x' is set but calib.states_device='cpu'"),
    ({"states_dir": "/tmp/x"}, r"calib.states_device=null: states_dir is used only with calib.states_device=disk"),
])
def test_bad_states_settings_are_one_line_errors(keys, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_group("calib", _calib(**keys))
    assert "\n" not in str(err.value)


def test_unwritable_states_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="calib.states_dir=.* cannot be written"):
        validate_calib(_calib(states_device="disk", states_dir=str(blocker / "sub")))


def test_states_settings_change_neither_the_calibration_key_nor_the_run_identity(tmp_path):
    from ream_exp.calib.cache import calibration_key
    from ream_exp.moe.tiny import tiny_tokenizer
    from ream_exp.identity import run_identity
    from tests.test_config import make_cfg

    plain = make_cfg("calib=toy")
    placed = make_cfg("calib=toy", "calib.states_device=disk", f"calib.states_dir={tmp_path}")
    tokenizer = tiny_tokenizer()
    assert calibration_key(plain.calib, tokenizer) == calibration_key(placed.calib, tokenizer)
    assert run_identity(plain) == run_identity(placed)
    assert run_identity(plain) != run_identity(make_cfg("calib=toy", "calib.n=3"))


# ---- no logits -------------------------------------------------------------------------------------------

def _count_head_calls(model):
    calls = []
    return calls, model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_observation_builds_no_logits_and_sees_the_same_bits(family):
    model = tiny_model(family, num_experts=8, top_k=2, layers=3)
    ids, mask = tiny_batch(batch=4, seq=12)
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    with torch.no_grad(), observing(model) as (want, token_mask):  # the full CausalLM forward, logits and all
        for b in batches:
            token_mask.value = b["attention_mask"].reshape(-1).bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    calls, hook = _count_head_calls(model)
    got = observe(model, batches, progress=False)
    capture_inputs(model, [{**b, "sim": b["attention_mask"], "align": b["attention_mask"]} for b in batches])
    hook.remove()
    assert calls == [], f"the output head ran on {calls}"
    assert sorted(got) == sorted(want)
    for i in want:
        assert got[i].tokens == want[i].tokens
        for name in ("count", "soft", "ean", "reap"):
            assert torch.equal(getattr(got[i], name), getattr(want[i], name)), (i, name)
