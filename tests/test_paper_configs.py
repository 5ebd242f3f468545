"""The paper's named calibration mixes, the model configs, and the MoE families those models need.

Every conf/model/<paper model>.yaml is checked against a local config.json of its architecture (the hub is
never reached): it passes `validate` for ratio 0.25 and 0.5, and its REAM group size resolves. An
architecture ream-exp cannot edit fails in `validate`, from config.json alone, before any weights load.
Tiny random Qwen3-Next, GLM-4.5 and DeepSeek-V2 models (three layers, one dense; DeepSeek-V2-Lite's greedy
routing) compress with REAP and REAM; every tiny family's own checks are parametrised by TINY_FAMILIES.
"""

import copy

import pytest
import torch
import transformers as tf
from omegaconf import OmegaConf

from ream_exp.calib import validate_calib
from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, canonical_weights, expert_output, moe_layers
from ream_exp.moe.families import config_value, family_for
from ream_exp.moe.tiny_configs import tiny_config
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.run import validate
from ream_exp.settings import check_group
from tests.test_config import CONF, make_cfg, options
from tests.tolerances import assert_f32_close

MIXES = {  # conf/calib/<name>.yaml -> general : math : code (docs/algorithms.md)
    "mix_3_3_3": [0.3, 0.3, 0.3], "mix_5_5_0": [0.5, 0.5, 0], "mix_5_0_5": [0.5, 0, 0.5],
    "mix_0_5_5": [0, 0.5, 0.5], "mix_2_5_3": [0.2, 0.5, 0.3], "mix_1_8_1": [0.1, 0.8, 0.1],
    "mix_0_7_3": [0, 0.7, 0.3], "mix_2_25_55": [0.2, 0.25, 0.55], "mix_1_1_8": [0.1, 0.1, 0.8],
    "mix_0_3_7": [0, 0.3, 0.7],
    "mix_general_only": [1, 0, 0], "mix_math_only": [0, 1, 0], "mix_code_only": [0, 0, 1],
}

MODELS = {  # conf/model/<name>.yaml -> (model_type, routed experts, top_k, REAM C at ratio 0.25, at 0.5)
    "qwen3_30b_a3b": ("qwen3_moe", 128, 8, 16, 32),
    "qwen3_next_80b_a3b": ("qwen3_next", 512, 10, 32, 64),
    "glm_4_5_air": ("glm4_moe", 128, 8, 16, 32),
    "mixtral_8x7b": ("mixtral", 8, 2, 2, 2),
    "olmoe_1b_7b": ("olmoe", 64, 8, 8, 16),
    "qwen1_5_moe_a2_7b": ("qwen2_moe", 60, 4, 8, 15),
    "deepseek_v2_lite": ("deepseek_v2", 64, 6, 8, 16),
    "gpt_oss_20b": ("gpt_oss", 32, 4, 4, 8),
    # the newest models, each validated against a tiny stand-in of its architecture
    "qwen3_5_122b_a10b": ("qwen3_5_moe", 256, 8, 32, 64),  # a vision tower beside the MoE text model
    "qwen3_coder_next": ("qwen3_next", 512, 10, 32, 64),
    "glm_4_7_flash": ("glm4_moe_lite", 64, 4, 8, 16),
}
GROUP_SIZE = "${oc.select:'model.group_size[${ratio}]',16}"  # what method.group_size reads (see the yamls)


def _cfg(*overrides, method="reap"):
    return make_cfg("model=local", "eval=none", "logger=none", f"method={method}", *overrides)


# ---- calibration mixes -----------------------------------------------------------------------------

def test_every_named_mix_is_listed():
    assert {o for o in options("calib") if o.startswith("mix_")} == set(MIXES)


@pytest.mark.parametrize("name", sorted(MIXES))
def test_named_mix_composes_on_the_paper_sources(name):
    calib = _cfg(f"calib={name}").calib
    assert calib.name == name and list(calib.mix) == pytest.approx(MIXES[name])
    assert (calib.n, calib.seq_len, calib.seed, calib.min_fill, calib.pack) == (3072, 512, 42, 0.9, False)
    assert [calib.sources[d].path for d in ("general", "math", "code")] == [
        "allenai/c4", "AI-MO/NuminaMath-1.5", "bigcode/the-stack-smol"]
    check_group("calib", calib)
    validate_calib(calib)


def test_free_ratios_and_bad_ratios():
    assert list(_cfg("calib=paper", "calib.mix=[0.2,0.25,0.55]").calib.mix) == [0.2, 0.25, 0.55]
    assert list(_cfg("calib=mix_0_5_5", "calib.mix=[0.1,0.1,0.8]").calib.mix) == [0.1, 0.1, 0.8]
    for mix, message in [("[0.5,-0.1,0.5]", "must be >= 0"), ("[0,0,0]", "all zero"), ("[0.5,0.5]", "3 ratios")]:
        with pytest.raises(ValueError, match=message):
            check_group("calib", _cfg("calib=paper", f"calib.mix={mix}").calib)


def test_reap_calibration_config():
    calib = _cfg("calib=reap").calib
    src = calib.sources.code
    assert (calib.n, calib.seq_len, calib.pack, list(calib.mix)) == (1024, 2048, True, [0, 0, 1])
    assert src.path == "theblackcat102/evol-codealpaca-v1" and src.format == "chat"
    assert dict(src.fields) == {"user": "instruction", "assistant": "output"}


# ---- model configs ---------------------------------------------------------------------------------

def test_every_model_config_is_listed():
    assert set(options("model")) - {"local", "toy"} == set(MODELS)


def _config_json(tmp_path, model_type, n, k):
    """A local config.json of the architecture (tiny sizes, the real expert count and top-k)."""
    cfg = tiny_config(model_type, num_experts=n, top_k=k, layers=2)
    assert config_value(cfg, family_for(model_type).count_key) == n
    cfg.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_validates_before_loading(name, tmp_path, monkeypatch):
    model_type, n, k, c25, c50 = MODELS[name]
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForImageTextToText):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded during validate"))
    cfg = _cfg(f"model={name}", "calib=toy", method="ream")
    assert cfg.model.name == name and "/" in cfg.model.path and not cfg.model.path.startswith(("/", "."))
    assert (cfg.model.dtype, cfg.model.device_map, cfg.model.trust_remote_code) == ("bfloat16", "auto", False)
    cfg.model.path = str(_config_json(tmp_path, model_type, n, k))
    for ratio, c in ((0.25, c25), (0.5, c50)):
        cfg.ratio = ratio
        assert validate(cfg).model_type == model_type
        cfg.method.group_size = GROUP_SIZE
        assert OmegaConf.to_container(cfg.method, resolve=True)["group_size"] == c


def test_qwen3_5_loads_with_its_vision_tower(tmp_path, monkeypatch):
    """Qwen3.5-MoE's config names a vision tower: it loads through AutoModelForImageTextToText (the tower
    kept and saved untouched), its text model's experts at model.language_model, the count in text_config."""
    from ream_exp.moe.registry import auto_model_class

    cfg = _cfg("model=qwen3_5_122b_a10b", "calib=toy", "ratio=0.25", method="ream")
    cfg.model.path = str(_config_json(tmp_path, "qwen3_5_moe", 256, 8))
    model_config = validate(cfg)
    family = family_for(model_config)
    assert auto_model_class(model_config) is tf.AutoModelForImageTextToText
    assert (family.decoder_path, family.count_keys) == ("model.language_model", ("text_config.num_experts",))


def test_group_size_falls_back_for_models_without_a_table(tmp_path):
    cfg = _cfg(f"model.path={tmp_path}", "ratio=0.5", method="ream")
    cfg.method.group_size = GROUP_SIZE
    assert cfg.method.group_size == 16


def test_unsupported_architecture_fails_from_config_json(tmp_path, monkeypatch):
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    tf.AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)  # dense
    cfg = _cfg("model=qwen3_30b_a3b", "calib=paper", f"model.path={tmp_path}")
    with pytest.raises(ValueError, match=r"model_type 'llama' is not a supported MoE architecture; "
                                         r"supported: .*glm4_moe.*qwen3_moe"):
        validate(cfg)


# ---- the families the model configs add ------------------------------------------------------------

NEW_FAMILIES = ("qwen3_next", "glm4_moe", "deepseek_v2")
# DeepSeek-V2-Lite (conf/model/deepseek_v2_lite.yaml) routes greedily over all experts; the tiny default
# routes group-limited like DeepSeek-V2 itself (tested with every tiny family)
GREEDY_V2 = {"topk_method": "greedy", "n_group": 1, "topk_group": 1}


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def tiny_new(request):
    """3 layers: qwen3_next linear / full / linear attention, the middle layer dense; glm4_moe (sigmoid router
    with correction bias) and deepseek_v2 (softmax router, MLA attention) with a dense first layer."""
    return tiny_model(request.param, layers=3, **(GREEDY_V2 if request.param == "deepseek_v2" else {}))


def test_new_family_layers_and_expert_layout(tiny_new):
    layers = moe_layers(tiny_new)
    dense = 1 if tiny_new.config.model_type == "qwen3_next" else 0  # mlp_only_layers / first_k_dense_replace
    assert [l.index for l in layers] == [i for i in range(3) if i != dense]
    layer = layers[0]
    assert layer.family.name == tiny_new.config.model_type and layer.num_experts == 8 and layer.top_k == 2
    assert layer.router_groups == 1
    x = torch.randn(5, 32)
    w = {k: v[0] for k, v in canonical_weights(layer.experts, [3]).items() if v is not None}
    expected = (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    assert_f32_close(expert_output(layer.experts, 3, x), expected, 32, stages=2)  # two matmuls, over H = 32


@pytest.mark.parametrize("method", ["reap", "ream"])
def test_new_family_compresses_and_reloads(tiny_new, method, tmp_path):
    model = copy.deepcopy(tiny_new)
    family = family_for(model.config.model_type)
    router_rows = {(l.index, n): t.clone() for l in moe_layers(model) for n, t in l.router.named_buffers()}
    ids, mask = tiny_batch(batch=8, seq=16)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{method}.yaml"))
    if method == "ream":
        cfg["group_size"] = 3  # reap has no group size (and refuses settings it does not have)
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, 0.5, cfg,
                  batch_size=4, progress=False)
    plan = get_method(method).plan(ctx)
    apply_plan(model, plan)
    assert getattr(model.config, family.count_key) == 4
    for layer, lp in zip(moe_layers(model), plan.layers):
        assert layer.num_experts == layer.router.num_experts == layer.experts.num_experts == 4
        for name, t in layer.router.named_buffers():  # e_score_correction_bias: the kept experts' entries
            assert torch.equal(t, router_rows[layer.index, name][lp.keep])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(expected).all()
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
