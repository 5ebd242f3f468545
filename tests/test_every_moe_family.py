"""Every MoE model type of the installed transformers, read from its registry (moe/registry.py) and built
tiny from its config class (moe/tiny_configs.py): each one ream-exp claims passes four checks, each one it
refuses is refused from its config alone, with a reason.

1. experts that are never routed removed: the logits stay (rounding only) those of the model whose routers
   score the removed experts -inf (the same unless the router's softmax, over fewer experts, now weighs or
   chooses the kept ones differently), and a save + stock `from_pretrained` reload gives the same logits
   bit for bit;
2. reap plans and compresses it, and the compressed model reloads with the same logits;
3. ream_official as a whole run, streamed (model.stream=true), writes the in-memory run's checkpoint
   (tests/test_stream.py), which reloads with the same logits;
4. the saved config.json holds the new count under every key that held the old one.

The vision-language model types whose text model is MoE (AutoModelForImageTextToText) get the same checks,
built and reloaded as that class builds them, towers kept: every tensor the plan does not touch (vision and
audio towers, projectors, embeddings, dense layers) reloads bit for bit. Calibration is text only.

The family table of docs/models.md is generated from the same claims (python -m ream_exp.moe.family_table).
"""

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from ream_exp.config import ConfigError, check_expert_counts
from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.discover import Unsupported
from ream_exp.moe.families import config_value, family_for
from ream_exp.moe.family_table import committed_table, markdown
from ream_exp.moe.registry import auto_model_class, causal_lm_moe_types, vision_language_moe_types
from ream_exp.moe.tiny import tiny_batch, tiny_model_of, tiny_tokenizer
from ream_exp.moe.tiny_configs import tiny_config
from ream_exp.plan import LayerPlan, Plan
from ream_exp.run import run
from tests.test_prune import _logits
from tests.merging_helpers import method_cfg
from tests.test_config import make_cfg
from tests.test_stream import _overrides, assert_same_checkpoint
from tests.tolerances import assert_f32_close

CAUSAL = causal_lm_moe_types()
VISION_LANGUAGE = vision_language_moe_types()
MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def _claim(model_type: str, **sizes):
    """The family ream-exp reads for the tiny config, or the reason it refuses it."""
    try:
        return family_for(tiny_config(model_type, **sizes))
    except Unsupported as exc:
        return str(exc)


CLAIMED = [mt for mt in CAUSAL + VISION_LANGUAGE if not isinstance(_claim(mt), str)]


def test_the_registry_lists_the_moe_families():
    """The registry is read, not typed: the nine families of the first tables and the newer ones are there."""
    assert {"qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "minimax_m2", "ernie4_5_moe"} <= set(CAUSAL)
    assert "llama" not in CAUSAL and len(CAUSAL) >= 53


def test_at_least_45_causal_lm_families_are_claimed():
    claimed = [mt for mt in CLAIMED if mt in CAUSAL]
    assert len(claimed) >= 45, sorted(set(CAUSAL) - set(claimed))


def test_the_registry_lists_the_vision_language_moe_families():
    """Image-text-to-text model types with a MoE text model, not in the causal-LM list; most are claimed."""
    assert {"qwen3_vl_moe", "glm4v_moe", "aria"} <= set(VISION_LANGUAGE) and not set(VISION_LANGUAGE) & set(CAUSAL)
    assert sum(mt in CLAIMED for mt in VISION_LANGUAGE) >= 11, sorted(set(VISION_LANGUAGE) - set(CLAIMED))


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "qwen3_vl_moe", "qwen3_5_moe_text", "qwen3_moe"])
def test_a_model_with_a_tower_loads_through_image_text_to_text(model_type):
    """A config with a vision tower is built (and loaded) with it; a text-only config as a causal LM."""
    config = tiny_config(model_type)
    tower = config.get_text_config() is not config
    assert auto_model_class(config) is (AutoModelForImageTextToText if tower else AutoModelForCausalLM)


def test_the_readme_family_table_is_the_generated_one():
    assert committed_table(MODELS_PAGE) == markdown(), "run: python -m ream_exp.moe.family_table --write docs/models.md"


@pytest.mark.parametrize("model_type", sorted(set(CAUSAL + VISION_LANGUAGE) - set(CLAIMED)))
def test_refused_families_are_refused_from_the_config_with_a_reason(model_type, monkeypatch):
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    config = tiny_config(model_type)
    with pytest.raises(ConfigError, match=rf"model.path: model_type {model_type!r}: \w+"):
        check_expert_counts(config, 0.5)


# ---- check 1 and 4: never-routed experts removed, saved, reloaded -------------------------------------

@contextlib.contextmanager
def _routers_without(model, removed: dict[int, list[int]]):
    """The unpruned model whose routers score the `removed` experts of each layer with logit -inf: what a
    router sliced to the kept rows computes (a softmax renormalised over them, choices among them), for
    every family, as the router's own code runs. The router's logits are F.linear(x, its weight rows)."""
    rows = {}
    for layer in moe_layers(model):
        state = dict(layer.router.named_parameters())
        for name, _, _ in layer.family.router_tensors:
            if state.get(name) is not None and state[name].dim() == 2:
                rows[state[name].data_ptr()] = removed.get(layer.index, [])
    linear = torch.nn.functional.linear

    def masked(x, weight, bias=None):
        out = linear(x, weight, bias)
        drop = rows.get(weight.data_ptr())
        if drop:
            out = out.clone()
            out[..., drop] = -torch.inf
        return out

    torch.nn.functional.linear = masked
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


_OTHER_NUMBER = re.compile(r"size|dim|per_tok|top|shared")  # widths and top-k, not expert counts


def _towers(config: dict) -> dict:
    """The nested configs of a saved config.json that are not the text model's (vision, audio, ...)."""
    return {k: v for k, v in config.items() if isinstance(v, dict) and k.endswith("_config") and k != "text_config"}


def _count_keys_agree(directory, family, before: int, after: int, original: dict | None = None) -> None:
    """Every key of config.json (the text model's nested configs too) that held the expert count holds the
    new one; a tower's config (its own experts are not the text model's) is the `original` one, unchanged."""
    saved = json.loads((directory / "config.json").read_text())
    reloaded = AutoConfig.from_pretrained(directory)  # the keys as the config class reads them (aliases too)
    if original is not None:
        assert _towers(reloaded.to_dict()) == _towers(original)

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in _towers(d):
                yield from walk(v, f"{prefix}{k}.")
            elif not isinstance(v, dict):
                yield f"{prefix}{k}", k, v

    stale = [key for key, name, v in walk(saved) if "expert" in name and not _OTHER_NUMBER.search(name) and (
        v == before or (isinstance(v, list) and before in v))]
    assert not stale, f"config.json keys still saying {before} experts: {stale}"
    for key in family.count_keys:
        value = config_value(reloaded, key)
        assert value == after or (isinstance(value, list) and after in value), (key, value)


def _unrouted_per_group(stats, layer) -> int:
    never = stats[layer.index].count == 0
    return int(never.view(layer.router_groups, -1).sum(-1).min())


def _never_routed_plan(model, batches, n: int):
    """reap's plan removing, in every MoE layer, as many never-routed experts as every layer (router group)
    has. Removing experts can move the routing of the kept ones (a softmax over fewer rows, a choice by
    probability plus bias), and then the routing of later layers: the never-routed experts are found again
    with the removed ones scored -inf, until the plan removes only experts that reference never routes."""
    removed, plan = None, None
    for _ in range(4):
        with _routers_without(model, removed or {}):
            stats = Context(model, batches, 0.0, {"name": "reap"}, progress=False).stats()
            layers = moe_layers(model)
            if removed is not None and all(set(removed[l.index]) <= _never(stats, l.index) for l in layers):
                return plan
            n_drop = min(l.router_groups * _unrouted_per_group(stats, l) for l in layers)
            assert n_drop >= 1, "test precondition: every MoE layer (router group) has experts never routed"
            plan = get_method("reap").plan(Context(model, batches, n_drop / n, {"name": "reap"}, progress=False))
        assert all(set(lp.removed) <= _never(stats, lp.layer) for lp in plan.layers)
        removed = {lp.layer: lp.removed for lp in plan.layers}
    raise AssertionError("the never-routed experts did not settle")


def _never(stats, index: int) -> set[int]:
    return set(torch.nonzero(stats[index].count == 0).flatten().tolist())


def _touched(model) -> set[str]:
    """State-dict names a plan may change: the routed experts and the expert-indexed router / block tensors."""
    family = family_for(model.config)
    touched = set()
    for layer in moe_layers(model):
        touched |= {f"{layer.name}.{family.experts_attr}.{n}" for n, _ in layer.experts.named_parameters()}
        touched |= {f"{layer.name}.{family.router_attr}.{n}" for n, _, _ in family.router_tensors}
        touched |= {f"{layer.name}.{n}" for n, _, _ in family.block_tensors}
    return touched


def _reload(directory):
    """The saved model as stock transformers loads it, by the Auto class its config.json names (towers too).

    Tensors that loading does not convert stay views of the memory-mapped file, 8 bytes past a 64-byte
    boundary, and CPU matrix products there round differently (Qwen3-VL-MoE's fused experts: 1.6e-7 in the
    logits); copied to fresh memory, as they are here, they compute the in-memory model's logits bit for bit."""
    model = auto_model_class(AutoConfig.from_pretrained(directory)).from_pretrained(directory).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("model_type", CLAIMED)
def test_removing_never_routed_experts_keeps_the_logits_through_a_reload(model_type, tmp_path):
    n = 16
    model = tiny_model_of(model_type, num_experts=n, top_k=2, seed=3)
    family = family_for(model.config)
    untouched = {k: t.clone() for k, t in model.state_dict().items() if k not in _touched(model)}
    original = model.config.to_dict()
    ids, mask = tiny_batch(batch=2, seq=5, pad_last=0)  # 10 tokens x top-2 over 16 experts: gaps everywhere
    plan = _never_routed_plan(model, {"input_ids": ids, "attention_mask": mask}, n)
    with _routers_without(model, {lp.layer: lp.removed for lp in plan.layers}):
        before = _logits(model, ids, mask)
    apply_plan(model, plan)
    pruned = _logits(model, ids, mask)
    text = model.config.get_text_config()
    assert_f32_close(pruned, before, text.hidden_size, text.num_hidden_layers + 1, msg=model_type)
    model.save_pretrained(tmp_path)
    reloaded = _reload(tmp_path)
    assert type(reloaded) is type(model)
    state = reloaded.state_dict()  # towers, projectors, embeddings, dense layers: bit for bit
    assert all(torch.equal(state[k], t) for k, t in untouched.items()), model_type
    n_after = n - len(plan.layers[0].removed)
    assert all(l.num_experts == n_after for l in moe_layers(reloaded))
    torch.testing.assert_close(_logits(reloaded, ids, mask), pruned, rtol=0, atol=0)
    _count_keys_agree(tmp_path, family, n, n_after, original)


# ---- check 2: reap compresses it -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_type", CLAIMED)
def test_reap_compresses_and_reloads(model_type, tmp_path):
    """reap's one-pass observation and pruning (ream_official, layer-wise: check 3 runs it twice)."""
    model = tiny_model_of(model_type, num_experts=8, top_k=2)
    family = family_for(model.config)
    ids, mask = tiny_batch(batch=4, seq=12)
    batches = {"input_ids": ids, "attention_mask": mask}
    plan = get_method("reap").plan(Context(model, batches, 0.5, method_cfg("reap"), batch_size=2, progress=False))
    apply_plan(model, plan)
    assert all(l.num_experts == 4 for l in moe_layers(model))
    expected = _logits(model, ids, mask)
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(_reload(tmp_path), ids, mask), expected,
                               rtol=0, atol=0)
    _count_keys_agree(tmp_path, family, 8, 4)


# ---- check 3: ream_official, streamed equals in memory -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model_type", CLAIMED)
def test_ream_official_streamed_equals_in_memory(model_type, calib_files, tmp_path):
    """ream_official (layer-wise merging) as a whole run, in memory and streamed from the shards (names on
    disk converted as from_pretrained converts them): the same checkpoint, reloading with the same logits."""
    source = tmp_path / "source"
    model = tiny_model_of(model_type, num_experts=8, top_k=2)
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    small = [o for o in _overrides(source, calib_files, tmp_path / "cache", "ream_official")
             if not o.startswith(("calib.n=", "calib.seq_len="))] + ["calib.n=8", "calib.seq_len=16"]
    for name, more in (("memory", ()), ("streamed", ("model.stream=true",))):
        run(make_cfg(*small, *more), tmp_path / name)
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
    _count_keys_agree(tmp_path / "memory" / "checkpoint", family_for(model.config), 8, 4)


# ---- special routing: what each family's own care keeps -------------------------------------------------

def _tensor(module, name):
    return (dict(module.named_parameters()) | dict(module.named_buffers()))[name]


@pytest.mark.parametrize("model_type", CLAIMED)
def test_expert_indexed_tensors_follow_the_kept_experts(model_type):
    """Router rows, router biases, correction biases kept on the block (MiniMax-M2, HY-V3, AFMoE, LFM2)
    and ERNIE's [1, E] bias keep exactly the kept experts' entries, in plan order; rows past the routed
    experts (LongCat's zero-compute experts, Inkling's shared-expert rows) stay after them."""
    model = tiny_model_of(model_type, num_experts=8, top_k=2)
    layer = moe_layers(model)[0]
    family = layer.family
    keep = [1, 2, 4, 7]  # two of each half: the tiny group-limited routers have n_group = 2
    tail = list(range(8, family.router_rows))
    tensors = [(layer.router, n, d, size) for n, d, size in family.router_tensors] + [
        (layer.block, n, d, size) for n, d, size in family.block_tensors]
    assert tensors, "every router has expert-indexed rows"
    want = [t_idx(_tensor(m, n), d, keep + (tail if size != 8 else [])) for m, n, d, size in tensors]
    apply_plan(model, Plan("test", 0.5, [LayerPlan(l.index, 8, keep) for l in moe_layers(model)]))
    for (module, name, dim, _), expected in zip(tensors, want):
        assert torch.equal(_tensor(module, name), expected), name


def t_idx(t, dim, index):
    return t.detach().index_select(dim, torch.as_tensor(index)).clone()


@pytest.mark.parametrize("model_type", CLAIMED)
def test_shared_experts_dense_and_hybrid_layers_are_untouched(model_type):
    """Everything but the routed experts and the expert-indexed router / block tensors stays bit for bit:
    shared experts and their gates, dense MLP layers, mamba / linear-attention layers of hybrid stacks, vision
    and audio towers."""
    model = tiny_model_of(model_type, num_experts=8, top_k=2)
    touched = _touched(model)
    before = {n: t.clone() for n, t in model.state_dict().items() if n not in touched}
    assert before
    apply_plan(model, Plan("test", 0.5, [LayerPlan(l.index, 8, [1, 2, 4, 7]) for l in moe_layers(model)]))
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_zero_compute_slots_are_not_counted():
    """LongCat-Flash's zero-compute experts (router rows after the routed ones) hand their slots to a real
    expert with weight 0: observation counts only the slots that reach a real expert."""
    model = tiny_model_of("longcat_flash", num_experts=8, top_k=2)
    layer = moe_layers(model)[0]
    assert layer.family.router_rows > layer.num_experts
    ids, mask = tiny_batch(batch=2, seq=8, pad_last=0)
    seen = []
    hook = layer.router.register_forward_hook(lambda m, a, out: seen.append(out[2].clone()))
    stats = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.0, {"name": "freq"}, progress=False).stats()
    hook.remove()
    index = torch.cat(seen)
    real = index[index < layer.num_experts]
    assert (index >= layer.num_experts).any(), "test precondition: some slots go to zero-compute experts"
    assert torch.equal(stats[layer.index].count, torch.bincount(real, minlength=8).double())


def test_hash_routed_layers_are_refused_with_their_reason():
    """DeepSeek-V4 routes some layers by a fixed token-to-expert table (tid2eid): its block needs the token
    ids, so it is refused, from its config, before any weights load."""
    with pytest.raises(Unsupported, match=r"deepseek_v4.*input_ids.*token id"):
        family_for(tiny_config("deepseek_v4"))


# the table the nine first families had before the architecture was read: (count key, router, scoring,
# group score of a group-limited router)
FIRST_TABLE = {
    "qwen3_moe": ("num_experts", "gate", "softmax", 0), "qwen2_moe": ("num_experts", "gate", "softmax", 0),
    "mixtral": ("num_local_experts", "gate", "softmax", 0), "olmoe": ("num_experts", "gate", "softmax", 0),
    "deepseek_v3": ("n_routed_experts", "gate", "sigmoid", 2), "gpt_oss": ("num_local_experts", "router", "softmax", 0),
    "qwen3_next": ("num_experts", "gate", "softmax", 0), "glm4_moe": ("n_routed_experts", "gate", "sigmoid", 2),
    "deepseek_v2": ("n_routed_experts", "gate", "softmax", 1),
}
GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}, "glm4_moe": {"n_group": 2, "topk_group": 1},
           "deepseek_v2": {"n_group": 2, "topk_group": 1}}


@pytest.mark.parametrize("model_type", sorted(FIRST_TABLE))
def test_the_first_families_read_as_their_table_said(model_type):
    """What is read from the model equals the hand-written table it replaces (tiny.py's own configs)."""
    from ream_exp.checkpoint import expert_count_names
    from ream_exp.moe.tiny import tiny_model

    count_key, router, scoring, group_score = FIRST_TABLE[model_type]
    family = family_for(tiny_model(model_type, **GROUPED.get(model_type, {})).config)
    assert (family.router_attr, family.scoring) == (router, scoring)
    assert family.group_score_experts == group_score
    config = tiny_model(model_type).config
    assert count_key in expert_count_names(config)
    assert getattr(config, family_for(config).count_key) == getattr(config, count_key)


def test_streaming_tells_a_towers_layers_from_the_decoder_layers(tmp_path):
    """Aria's vision tower has its own `layers.N`: the streamed path reads and writes them with the embeddings,
    never with a decoder layer (each checkpoint key by the model entry it loads into)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from ream_exp.stream_source import checkpoint_layers, decoder_layer_of, key_files

    model = tiny_model_of("aria")
    model.save_pretrained(tmp_path)
    keys = key_files(tmp_path)
    of = checkpoint_layers(model, get_model_conversion_mapping(model), keys)
    tower = [k for k in keys if "vision_tower" in k and ".layers." in k]
    decoder = [k for k in keys if "language_model" in k and ".layers." in k]
    assert tower and decoder
    assert all(of[k] is None for k in tower) and {of[k] for k in decoder} == set(range(3))
    names = decoder_layer_of(model)
    assert {names(n) for n in model.state_dict() if "vision_tower" in n} == {None}
