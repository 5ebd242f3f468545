"""Multi-token-prediction layers survive compression (docs/models.md): read from the source shards,
compressed to the same expert count as every other layer with their own statistics, written in the
source's key layout; the main model is the one a checkpoint without them gives."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ream_exp.config import ConfigError
from ream_exp.methods import ream
from ream_exp.methods.observation import Needs, observing_layer
from ream_exp.moe import MoELayer, apply_layer_plan, canonical_weights, family_for
from ream_exp.moe.mtp import find_mtp
from ream_exp.moe.tiny import tiny_batch
from ream_exp.plan import LayerPlan
from ream_exp.run import run, validate
from ream_exp.timing import Timings
from tests.mtp_helpers import QWEN_MTP, mtp_source, read_all
from tests.test_config import make_cfg
from tests.test_offload import CLOSE
from tests.test_stream import assert_same_checkpoint
from tests.tolerances import assert_f32_close

N = 3  # decoder layers of the tiny models; the MTP layer is number 3 (nextn layout)
PARTS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    ids, mask = tiny_batch(batch=8, seq=24, seed=1, pad_last=5)  # every other row right-padded: pads never count
    torch.save({"input_ids": ids, "attention_mask": mask}, root / "calib.pt")
    return {"mtp": mtp_source(root), "plain": mtp_source(root, with_mtp=False), "root": root}


def _cfg(source, sources, cache, method, *extra):
    return make_cfg("model=local", f"model.path={source}", "calib=pretokenized",
                    f"calib.path={sources['root'] / 'calib.pt'}", "calib.batch_size=4", "eval=none", "logger=none",
                    f"cache_dir={cache}", "progress=false", f"method={method}", "ratio=0.5", "baseline=false", *extra)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def _mtp_moe_inputs(main_dir: Path, source: Path, calib: dict):
    """The MTP layer's MoE-block inputs [B, S-1, H] at positions 0..S-2 and which of them are real pairs,
    computed by hand: h = the main model's final-normed last hidden state (transformers' own forward),
    x = eh_proj([enorm(e_{t+1}); hnorm(h_t)]), then the MTP decoder layer up to its MoE block, loaded by
    transformers as layer N of a model one layer deeper, on a causal mask over the S-1 positions."""
    w = read_all(source)
    main = AutoModelForCausalLM.from_pretrained(main_dir).eval()
    ids, mask = calib["input_ids"], calib["attention_mask"]
    h = main.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    eps = main.config.rms_norm_eps
    e = w["model.embed_tokens.weight"][ids[:, 1:]]
    p = f"model.layers.{N}."
    x = F.linear(torch.cat([_rms(e, w[p + "enorm.weight"], eps), _rms(h, w[p + "hnorm.weight"], eps)], -1),
                 w[p + "eh_proj.weight"])
    deeper = AutoModelForCausalLM.from_pretrained(source, num_hidden_layers=N + 1).eval()
    layer = deeper.model.layers[N]
    length = x.shape[1]
    pos = torch.arange(length)[None].expand(x.shape[0], -1)
    keys = mask[:, :-1].bool()
    allowed = (pos[:, None, :] <= pos[:, :, None]) & keys[:, None, :]
    attn = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    seen = {}
    hook = layer.mlp.register_forward_hook(lambda _m, inp, _out: seen.update(x=inp[0]))
    layer(x, attention_mask=attn, position_ids=pos, position_embeddings=deeper.model.rotary_emb(x, pos))
    hook.remove()
    real = (mask[:, :-1] & mask[:, 1:]).bool()
    return seen["x"], real, deeper, w


def _calibration(cfg):
    return torch.load(cfg.calib.path, weights_only=True)


def _expert(w, prefix, e):
    return [w[f"{prefix}mlp.experts.{e}.{part}.weight"] for part in PARTS]


def test_reap_prunes_the_mtp_layer_by_its_own_saliency(sources, tmp_path):
    """reap keeps the MTP layer's top-N' experts by REAP saliency computed by hand on the MTP's own inputs
    (DeepSeek-V3 routing written out), and writes them, their router rows and correction biases as they were."""
    cfg = _cfg(sources["mtp"], sources, tmp_path / "cache", "reap")
    run(cfg, tmp_path / "run")
    out = tmp_path / "run" / "checkpoint"
    x, real, deeper, w = _mtp_moe_inputs(sources["mtp"], sources["mtp"], _calibration(cfg))
    p = f"model.layers.{N}."
    x = x[real]  # [T, H] the observed tokens
    logits = x @ w[p + "mlp.gate.weight"].T
    scores = logits.sigmoid()
    choice = (scores + w[p + "mlp.gate.e_score_correction_bias"]).topk(2, dim=-1).indices
    weight = scores.gather(1, choice)
    weight = weight / weight.sum(-1, keepdim=True) * deeper.config.routed_scaling_factor
    total, count = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    for e in range(8):
        gate, up, down = _expert(w, p, e)
        y = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
        routed = (choice == e).any(-1)
        g = (weight * (choice == e)).sum(-1)
        total[e] = (g[routed].double() * y[routed].double().norm(dim=-1)).sum()
        count[e] = routed.sum()
    saliency = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    keep = sorted(sorted(range(8), key=lambda e: (-float(saliency[e]), e))[:4])

    plan = json.loads((out / "plan.json").read_text())["layers"][-1]
    assert plan["layer"] == N and plan["keep"] == keep
    assert_f32_close(torch.tensor(plan["saliency"], dtype=torch.float64), saliency, terms=int(count.max()), stages=8)
    written = read_all(out)
    for i, e in enumerate(keep):
        for part, t in zip(PARTS, _expert(w, p, e)):
            assert torch.equal(written[f"{p}mlp.experts.{i}.{part}.weight"], t), (i, part)
    assert torch.equal(written[p + "mlp.gate.weight"], w[p + "mlp.gate.weight"][keep])
    assert torch.equal(written[p + "mlp.gate.e_score_correction_bias"], w[p + "mlp.gate.e_score_correction_bias"][keep])
    mtp_keys = {k for k in w if k.startswith(p)}
    expert_keys = {k for k in mtp_keys if ".mlp.experts." in k}
    assert {k for k in written if k.startswith(p)} == (mtp_keys - expert_keys) | {
        f"{p}mlp.experts.{i}.{part}.weight" for i in range(4) for part in PARTS}
    for k in mtp_keys - expert_keys - {p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"}:
        assert torch.equal(written[k], w[k]), k  # attention, norms, projection, shared expert, head copies
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 4 and config["num_nextn_predict_layers"] == 1


def test_ream_merges_the_mtp_layer_on_the_compressed_models_states(sources, tmp_path):
    """ream_official (sequential) merges the MTP layer as the plan function merges it on statistics observed
    on the MTP's own inputs, computed by hand from the compressed main model's last hidden states."""
    cfg = _cfg(sources["mtp"], sources, tmp_path / "cache", "ream_official")
    run(cfg, tmp_path / "run")
    out = tmp_path / "run" / "checkpoint"
    saved = json.loads((out / "plan.json").read_text())
    x, real, deeper, w = _mtp_moe_inputs(out, sources["mtp"], _calibration(cfg))  # h from the compressed model
    block = deeper.model.layers[N].mlp
    layer = MoELayer(N, "reference", block, block.gate, block.experts, family_for(deeper.config))
    s = ream.settings({**saved["info"]["settings"], "name": "ream_official"})
    needs = Needs(dense="gated" if s["gated_sim"] else "plain", align=s["align"] in ("both", "activations"),
                  sim_tokens=s["sim_tokens"], align_tokens=int(s["align_tokens"]))
    flat = real.reshape(-1)
    rows = flat.nonzero().squeeze(1)
    with torch.no_grad(), observing_layer(layer, needs) as (obs, current):
        current["batch"] = SimpleNamespace(valid=flat, rows=lambda _name: rows)
        block(x)
    lp = ream.plan_layer(layer, obs, 4, Timings(), s, int(cfg.seed))
    mine = LayerPlan(**{k: v for k, v in saved["layers"][-1].items()})
    assert mine.layer == N and mine.keep == lp.keep and mine.groups == lp.groups
    assert any(len(g) > 1 for g in lp.groups)
    tokens = int(real.sum())
    assert_f32_close(torch.tensor(mine.merge_weights[0]), torch.tensor(lp.merge_weights[0]), terms=tokens, stages=8)
    with torch.no_grad():
        apply_layer_plan(layer, lp)
    written = read_all(out)
    p = f"model.layers.{N}."
    assert torch.equal(written[p + "mlp.gate.weight"], block.gate.weight)  # the centroids' rows
    assert torch.equal(written[p + "mlp.gate.e_score_correction_bias"], block.gate.e_score_correction_bias)
    for i in range(4):
        ref = canonical_weights(block.experts, [i])
        for part, name in zip(PARTS, ("gate", "up", "down")):
            assert_f32_close(written[f"{p}mlp.experts.{i}.{part}.weight"], ref[name][0], terms=tokens, stages=8,
                             msg=f"expert {i} {part}")
    assert not any(f"mlp.experts.{i}." in k for k in written for i in range(4, 8))


@pytest.mark.slow
def test_main_model_unchanged_by_the_mtp_layer_and_streamed_equal(sources, tmp_path):
    """The main model of a checkpoint with an MTP layer is the one the same run without it writes (same
    tensors, same logits in stock transformers); a streamed run writes the same checkpoint, MTP included."""
    cache = tmp_path / "cache"
    run(_cfg(sources["plain"], sources, cache, "ream_official"), tmp_path / "plain")
    run(_cfg(sources["mtp"], sources, cache, "ream_official"), tmp_path / "memory")
    run(_cfg(sources["mtp"], sources, cache, "ream_official", "model.stream=true"), tmp_path / "streamed")
    assert_same_checkpoint(tmp_path / "memory" / "checkpoint", tmp_path / "streamed" / "checkpoint")
    plain, memory = (read_all(tmp_path / d / "checkpoint") for d in ("plain", "memory"))
    assert set(memory) - set(plain) == {k for k in memory if k.startswith(f"model.layers.{N}.")}
    for k, t in plain.items():
        assert torch.equal(memory[k], t), k
    ids, mask = tiny_batch()
    logits = []
    for d in ("plain", "memory"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / d / "checkpoint").eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(*logits)
    index = json.loads((tmp_path / "memory" / "checkpoint" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(memory)


@pytest.mark.parametrize("family, extra", [("qwen3_next", ()), ("qwen3_next", ("model.stream=true",)),
                                           ("qwen3_5_moe_text", ()), ("glm4_moe", ()), ("glm4_moe_lite", ())])
def test_every_mtp_layout(family, extra, sources, tmp_path):
    """Qwen3-Next's and Qwen3.5's `mtp.` layout (in memory and streamed) and GLM-4.5's and GLM-4.7-Flash's
    nextn one: the MTP layer is pruned to N' experts and written back where the source keeps it, everything
    else of it as it was."""
    source = mtp_source(sources["root"], family)
    run(_cfg(source, sources, tmp_path / "cache", "reap", *extra), tmp_path / "run")
    out = tmp_path / "run" / "checkpoint"
    plan = json.loads((out / "plan.json").read_text())["layers"][-1]
    keep, w, written = plan["keep"], read_all(source), read_all(out)
    p = "mtp.layers.0." if family in QWEN_MTP else f"model.layers.{N}."
    assert plan["layer"] == N and len(keep) == 4
    assert torch.equal(written[p + "mlp.gate.weight"], w[p + "mlp.gate.weight"][keep])
    for i, e in enumerate(keep):
        for part in PARTS:
            assert torch.equal(written[f"{p}mlp.experts.{i}.{part}.weight"], w[f"{p}mlp.experts.{e}.{part}.weight"])
    mtp = "mtp." if family in QWEN_MTP else f"model.layers.{N}."
    rest = {k for k in w if k.startswith(mtp) and ".experts." not in k and ".mlp.gate." not in k}
    assert rest and {k for k in written if k.startswith(mtp) and ".experts." not in k and ".mlp.gate." not in k} == rest
    for k in rest:
        assert torch.equal(written[k], w[k]), k


def test_unknown_mtp_layout_kept_or_refused(sources, tmp_path):
    """MTP tensors of a family whose layout ream-exp does not know are refused before any load when the
    expert count would change, and copied unchanged when it does not."""
    source = mtp_source(sources["root"], "qwen3_moe")  # nextn-style tensors; no MTP layout is known for qwen3_moe
    refused = r"multi-token-prediction tensors .*'qwen3_moe' has no known MTP layout.* use ratio=0"
    with pytest.raises(ConfigError, match=refused):
        validate(_cfg(source, sources, tmp_path / "cache", "reap"))
    run(_cfg(source, sources, tmp_path / "cache", "none", "ratio=0"), tmp_path / "kept")
    before, after = read_all(source), read_all(tmp_path / "kept" / "checkpoint")
    for k in (k for k in before if k.startswith(f"model.layers.{N}.")):
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


def test_find_mtp_layouts():
    """Key lists of each layout are read as such; a vision tower's deeper layers or a second MTP layer are not
    mistaken for a known layout."""
    from ream_exp.moe.tiny_configs import tiny_config

    config = tiny_config("deepseek_v3", layers=2)
    main = [f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate", "experts.0.up_proj")]
    main.append("model.norm.weight")
    nextn = [f"model.layers.2.{p}.weight" for p in ("enorm", "hnorm", "eh_proj", "shared_head.norm",
                                                       "mlp.gate", "self_attn.o_proj")]
    assert find_mtp(main + [f"model.vision.layers.{i}.w" for i in range(5)], config) is None
    found = find_mtp(main + nextn, config)
    assert found.layout.name == "nextn" and found.layer_prefix == "model.layers.2."
    assert found.layer_keys == ["model.layers.2.mlp.gate.weight", "model.layers.2.self_attn.o_proj.weight"]
    two = find_mtp(main + nextn + [k.replace("layers.2.", "layers.3.") for k in nextn], config)
    assert two.layout is None and "2 MTP decoder layers" in two.reason
    qwen = tiny_config("qwen3_next", layers=4, mlp_only_layers=[])
    mtp = [f"mtp.{p}.weight" for p in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm")]
    found = find_mtp([k.replace("layers.1.", f"layers.{i}.") for k in main[2:4] for i in range(4)] + mtp
                     + ["mtp.layers.0.mlp.gate.weight"], qwen)
    assert found.layout.name == "mtp" and found.layer_keys == ["mtp.layers.0.mlp.gate.weight"]


@pytest.mark.parametrize("method", ["reap", "ream_official"])
def test_offloaded_run_writes_the_same_mtp_layer(method, sources, tmp_path):
    """With decoder layers offloaded to disk (accelerate), the MTP layer is compressed and written as in memory."""
    from omegaconf import OmegaConf

    run(_cfg(sources["mtp"], sources, tmp_path / "a", method), tmp_path / "plain")
    cfg = _cfg(sources["mtp"], sources, tmp_path / "b", method, f"model.offload_folder={tmp_path / 'offload'}")
    cfg.model.device_map = OmegaConf.create({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                                             "model.layers.0": "cpu", "model.layers.1": "disk",
                                             "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"})
    run(cfg, tmp_path / "offloaded")
    plans = [json.loads((tmp_path / d / "plan.json").read_text())["layers"] for d in ("plain", "offloaded")]
    assert [(lp["layer"], lp["keep"], lp["groups"]) for lp in plans[0]] == [
        (lp["layer"], lp["keep"], lp["groups"]) for lp in plans[1]]
    a, b = (read_all(tmp_path / d / "checkpoint") for d in ("plain", "offloaded"))
    assert a.keys() == b.keys() and any(k.startswith(f"model.layers.{N}.") for k in a)
    for k in a:  # the same float32 operations on the same values; offloaded tensors may be laid out otherwise
        torch.testing.assert_close(b[k], a[k], **CLOSE, msg=k)


def test_global_budget_refused_beside_mtp_layers(sources, tmp_path):
    """A per-layer budget beside MTP tensors is refused before any load: the MTP layer's experts share the
    config's one expert count."""
    with pytest.raises(ConfigError, match=r"^budget=global: .* has multi-token-prediction layers.*use budget=uniform$"):
        validate(_cfg(sources["mtp"], sources, tmp_path / "cache", "reap", "budget=global"))


def test_quant_refused_beside_mtp_layers(sources, tmp_path, monkeypatch):
    """A quant stage beside MTP tensors is refused before any load: llm-compressor reloads the checkpoint
    without them (the quantization environment's own checks passed over, as it may not be built here)."""
    import ream_exp.run as run_module

    monkeypatch.setattr(run_module, "check_quant", lambda cfg, config: {})
    with pytest.raises(ConfigError, match=r"^quant=w4a16_gptq: .* has multi-token-prediction layers.*use quant=none$"):
        validate(_cfg(sources["mtp"], sources, tmp_path / "cache", "reap", "quant=w4a16"))
