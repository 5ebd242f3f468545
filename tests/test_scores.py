"""Scores without calibration data (AIMER, router norm), gate-free activation norms (MAN, MSAN) and protected
(super) experts, docs/algorithms.md: each score against a float64 reference computed another way (plain
loops over experts, weights and tokens), the invariants (a permutation of the experts permutes the scores,
ratio 0 changes nothing), protection in every method, and the runs that read no calibration data."""

from __future__ import annotations

import math

import pytest
import torch

from ream_exp import run as run_module
from ream_exp.config import ConfigError
from ream_exp.methods import Context, get_method, protect, reads_calibration, top_experts
from ream_exp.methods.protect import super_experts
from ream_exp.methods.scores import aimer_importance, aimer_ratio, router_norm
from ream_exp.moe import apply_plan, keep_experts, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model
from ream_exp.observe import observe
from tests.merging_helpers import method_cfg, run_method
from tests.test_moe_families import _reference_expert
from tests.test_observe import _block_inputs
from tests.test_settings import _toy_eval_cfg, no_model_load  # noqa: F401 (a fixture)
from tests.tolerances import assert_f32_close

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3"]  # plain, biased with its own gate, sigmoid + correction bias


def _calib(ids, mask):
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- the scores against references computed another way --------------------------------------------

def _reference_aimer(layer) -> list[float]:
    """A_i from the experts module's raw weight parameters (fused or not, whatever their layout: the set of
    entries is the expert's gate, up and down weights), summed with math.fsum over plain Python floats."""
    weights = [p for name, p in layer.experts.named_parameters() if "bias" not in name]
    out = []
    for e in range(layer.num_experts):
        values = [float(v) for p in weights for v in p[e].detach().double().flatten()]
        n = len(values)
        out.append(math.fsum(abs(v) for v in values) / n / math.sqrt(math.fsum(v * v for v in values) / n))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_aimer_is_the_mean_absolute_weight_over_its_rms(family):
    model = tiny_model(family, layers=2)
    for layer in moe_layers(model):
        want = torch.tensor(_reference_aimer(layer), dtype=torch.float64)
        # float64 sums of ~3 * H * I terms both ways: a few units of the last float64 place
        torch.testing.assert_close(aimer_ratio(layer), want, rtol=1e-12, atol=0)
        assert (want < 1).all() and (want > 0).all()  # Cauchy-Schwarz: mean|w| <= rms(w)
        torch.testing.assert_close(aimer_importance(layer), 1 / want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_norm_is_the_l2_norm_of_each_router_row(family):
    model = tiny_model(family, layers=2)
    for layer in moe_layers(model):
        rows = layer.router.weight.detach().double()
        want = [math.sqrt(math.fsum(float(v) ** 2 for v in rows[i])) for i in range(layer.num_experts)]
        torch.testing.assert_close(router_norm(layer), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def _brute_force_norms(model, ids, mask):
    """Per layer: MAN, MSAN and the peak max(0, max entry of E_i(x)) from loops over every non-pad token and
    top-k slot, each expert output written out in float64 (tests/test_moe_families.py)."""
    inputs, valid = _block_inputs(model, ids, mask), mask.reshape(-1).bool()
    out = {}
    for layer in moe_layers(model):
        h = inputs[layer.index].reshape(-1, model.config.hidden_size)
        with torch.no_grad():
            _, _, index = layer.router(h)
        n = layer.num_experts
        count, norm, sq, peak = ([0.0] * n for _ in range(4))
        for t in range(h.shape[0]):
            if not valid[t]:
                continue
            for k in range(index.shape[1]):
                e = int(index[t, k])
                with torch.no_grad():
                    y = _reference_expert(layer, e, h[t:t + 1])[0]
                count[e] += 1
                norm[e] += float(y.norm())
                sq[e] += float(y.norm()) ** 2
                peak[e] = max(peak[e], float(y.max()))
        def mean(total):
            return torch.tensor([total[e] / count[e] if count[e] else 0.0 for e in range(n)], dtype=torch.float64)

        out[layer.index] = {"man": mean(norm), "msan": mean(sq), "peak": torch.tensor(peak, dtype=torch.float64)}
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_gate_free_norms_and_peaks_match_brute_force(family):
    model = tiny_model(family)
    ids, mask = tiny_batch(batch=4, seq=12)
    stats = observe(model, [_calib(ids[:2], mask[:2]), _calib(ids[2:], mask[2:])], progress=False)
    ref = _brute_force_norms(model, ids, mask)
    stages = model.config.num_hidden_layers + 1  # float32 model vs float64 reference, as tests/test_observe.py
    for index, want in ref.items():
        s = stats[index]
        assert_f32_close(s.score("man").cpu(), want["man"], model.config.hidden_size, stages, msg=f"{index} man")
        # a square doubles the relative rounding of the norm
        assert_f32_close(s.score("msan").cpu(), want["msan"], model.config.hidden_size, 2 * stages, msg=f"{index}")
        assert_f32_close(s.peak.cpu(), want["peak"], model.config.hidden_size, stages, msg=f"{index} peak")
        assert (s.man_score[s.count == 0] == 0).all() and (s.msan_score[s.count == 0] == 0).all()


def _all_scores(model, ids, mask) -> dict[int, dict[str, torch.Tensor]]:
    stats = observe(model, [_calib(ids, mask)], progress=False)
    return {l.index: {"aimer": aimer_ratio(l), "router_norm": router_norm(l), "man": stats[l.index].man_score,
                      "msan": stats[l.index].msan_score, "peak": stats[l.index].peak} for l in moe_layers(model)}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_permutation_of_the_experts_permutes_every_score(family):
    model = tiny_model(family, layers=2)
    ids, mask = tiny_batch()
    before = _all_scores(model, ids, mask)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(4)).tolist()
    for layer in moe_layers(model):
        keep_experts(layer, perm)  # the same experts in the order perm: the model computes the same function
    after = _all_scores(model, ids, mask)
    for i, scores in before.items():
        for name in ("aimer", "router_norm"):  # the same weights: the same sums, bit for bit
            assert torch.equal(after[i][name], scores[name][perm]), name
        for name in ("man", "msan", "peak"):  # the same tokens routed, summed in the same order up to rounding
            assert_f32_close(after[i][name], scores[name][perm], model.config.hidden_size,
                             2 * model.config.num_hidden_layers + 2, msg=name)


# ---- the presets --------------------------------------------------------------------------------------

PRESETS = ["aimer", "router_norm", "man", "msan"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("protection", ["none", "super"])
def test_ratio_zero_changes_no_logit(name, protection):
    model = tiny_model("qwen3_moe")
    ids, mask = tiny_batch()
    before = _logits(model, ids, mask)
    plan = get_method(name).plan(Context(model, _calib(ids, mask), 0.0, {"name": name, "protect": protection},
                                         progress=False))
    apply_plan(model, plan)
    assert all(l.num_experts == 8 for l in moe_layers(model))
    assert torch.equal(_logits(model, ids, mask), before)


@pytest.mark.parametrize("name", ["aimer", "router_norm"])
def test_weights_only_presets_read_no_calibration(name):
    model = tiny_model("mixtral")
    assert not reads_calibration(get_method(name), {"name": name, "protect": "none"})
    assert reads_calibration(get_method(name), {"name": name, "protect": "super"})  # the maxima are observed
    plan = get_method(name).plan(Context(model, None, 0.5, {"name": name, "protect": "none"}, progress=False))
    for layer, lp in zip(moe_layers(model), plan.layers):
        a = aimer_ratio(layer) if name == "aimer" else router_norm(layer)
        kept, removed = a[lp.keep], a[lp.removed]
        if name == "aimer":  # AIMER removes the highest A_i
            assert len(lp.keep) == 4 and kept.max() <= removed.min()
            assert lp.scores["aimer"] == a.tolist()
        else:
            assert len(lp.keep) == 4 and kept.min() >= removed.max()
        assert lp.keep == top_experts(torch.tensor(lp.saliency), 4)


@pytest.mark.parametrize("name", ["man", "msan"])
def test_gate_free_presets_keep_the_highest_scores(name):
    model = tiny_model("mixtral", num_experts=8, top_k=2)
    ids, mask = tiny_batch(batch=6, seq=16)
    stats = observe(model, [_calib(ids, mask)], progress=False)
    plan = get_method(name).plan(Context(model, _calib(ids, mask), 0.5, {"name": name}, progress=False))
    for lp in plan.layers:
        s = stats[lp.layer].score(name)
        assert lp.keep == top_experts(s, 4) and lp.scores[name] == s.tolist() == lp.saliency


def test_ream_ranks_its_centroids_by_the_chosen_score():
    model = tiny_model("qwen3_moe", layers=2)
    ids, mask = tiny_batch()
    importance = {l.index: aimer_importance(l) for l in moe_layers(model)}  # before any layer is merged
    plan = run_method(model, method_cfg("ream", "method.saliency=aimer", "method.align=none"), ids, mask)
    for lp in plan.layers:
        assert sorted(lp.centroids) == top_experts(importance[lp.layer], 4)
        assert lp.scores["aimer"] == importance[lp.layer].tolist()


def test_m_smoe_frequency_default_is_its_score():
    model = tiny_model("qwen3_moe", layers=2)
    ids, mask = tiny_batch()
    twin = tiny_model("qwen3_moe", layers=2)
    plain = run_method(model, method_cfg("m_smoe"), ids, mask)
    named = run_method(twin, method_cfg("m_smoe", "+method.saliency=freq"), ids, mask)
    assert [lp.groups for lp in plain.layers] == [lp.groups for lp in named.layers]
    norms = {l.index: router_norm(l) for l in moe_layers(tiny_model("qwen3_moe", layers=2))}
    other = run_method(tiny_model("qwen3_moe", layers=2), method_cfg("m_smoe", "+method.saliency=router_norm"),
                       ids, mask)
    for lp in other.layers:  # dominant experts: the highest router norms
        assert sorted(lp.centroids) == top_experts(norms[lp.layer], 4)


# ---- protected (super) experts -------------------------------------------------------------------------

def _reference_threshold(values: list[float]) -> float:
    """max(99.5th percentile with linear interpolation between order statistics, max / 10), by hand."""
    v = sorted(values)
    pos = (len(v) - 1) * 0.995
    lo = math.floor(pos)
    q = v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
    return max(q, v[-1] / 10)


def test_super_experts_follow_reaps_rule():
    gen = torch.Generator().manual_seed(0)
    peaks = {i: torch.rand(64, generator=gen, dtype=torch.float64) for i in range(8)}  # 8 MoE layers of 64
    peaks[1][3], peaks[7][5], peaks[2][7], peaks[0][0] = 50.0, 45.0, 6.0, 4.0
    tau = _reference_threshold([float(v) for p in peaks.values() for v in p])
    assert tau == pytest.approx(5.0)  # max / 10 beats the percentile (4 + 0.445 * (6 - 4)) here
    want = {i: [e for e in range(64) if peaks[i][e] > tau] for i in range(6)}  # the first floor(0.75 * 8) layers
    assert super_experts(peaks) == want == {0: [], 1: [3], 2: [7], 3: [], 4: [], 5: []}
    # the percentile beats max / 10 when many experts are large: only those above it
    peaks = {i: torch.arange(16, dtype=torch.float64) + 16 * i for i in range(4)}  # 0..63
    tau = _reference_threshold([float(v) for p in peaks.values() for v in p])
    assert tau == pytest.approx(62.685)  # 63 * 0.995, between the two largest
    assert super_experts(peaks) == {0: [], 1: [], 2: []}  # 63 > tau, but in the last quarter of the layers
    peaks[3], peaks[0] = peaks[0], peaks[3]
    assert super_experts(peaks) == {0: [15], 1: [], 2: []}


def _outlier_model():
    """Expert 5 of the first MoE layer has its down projection scaled up: a super expert."""
    model = tiny_model("qwen3_moe", layers=4)
    with torch.no_grad():
        moe_layers(model)[0].experts.down_proj[5] *= 100
    return model


def test_an_expert_with_outlier_outputs_is_super():
    model = _outlier_model()
    ids, mask = tiny_batch()
    stats = observe(model, [_calib(ids, mask)], progress=False)
    assert stats[0].count[5] > 0, "test precondition: expert 5 is routed"
    first = [l.index for l in moe_layers(model)][: int(0.75 * len(stats))]
    assert super_experts({i: s.peak for i, s in stats.items()}) == {i: [5] if i == 0 else [] for i in first}


def _weakest_protected(monkeypatch, pick):
    """Make method.protect=super protect, per layer, the expert `pick(layer index)` (the detection is tested
    above; here the one a method would otherwise drop or merge)."""
    monkeypatch.setattr(protect, "super_experts", lambda peaks: {i: [pick(i)] for i in peaks})


@pytest.mark.parametrize("name", ["aimer", "router_norm", "man", "reap", "ean"])
def test_protected_experts_are_never_removed(name, monkeypatch):
    ids, mask = tiny_batch()
    cfg = method_cfg(name) if name in ("reap",) else {"name": name}
    unprotected = run_method(tiny_model("qwen3_moe"), {**cfg, "protect": "none"}, ids, mask, ratio=0.75)
    dropped = {lp.layer: lp.removed[0] for lp in unprotected.layers}
    _weakest_protected(monkeypatch, dropped.get)
    plan = run_method(tiny_model("qwen3_moe"), {**cfg, "protect": "super"}, ids, mask, ratio=0.75)
    for lp in plan.layers:
        assert dropped[lp.layer] in lp.keep and len(lp.keep) == 2
    assert plan.info["protected"] == {str(i): [e] for i, e in sorted(dropped.items())}  # recorded in plan.json
    assert "protected" not in unprotected.info


@pytest.mark.parametrize("name,overrides", [("ream", ["method.align=none"]), ("m_smoe", []),
                                            ("hc_smoe", ["method.align=none"])])
def test_protected_experts_are_never_merged(name, overrides, monkeypatch):
    ids, mask = tiny_batch()
    cfg = method_cfg(name, *overrides)
    unprotected = run_method(tiny_model("qwen3_moe"), cfg, ids, mask)
    merged = {lp.layer: next(g for g in lp.groups if len(g) > 1)[-1] for lp in unprotected.layers}
    _weakest_protected(monkeypatch, merged.get)
    plan = run_method(tiny_model("qwen3_moe"), {**cfg, "protect": "super"}, ids, mask)
    for lp in plan.layers:
        assert [merged[lp.layer]] in lp.groups and len(lp.groups) == 4
        assert sorted(e for g in lp.groups for e in g) == list(range(8))
    assert plan.info["protected"] == {str(i): [e] for i, e in sorted(merged.items())}


def test_too_many_protected_experts_are_refused(monkeypatch):
    ids, mask = tiny_batch()
    monkeypatch.setattr(protect, "super_experts", lambda peaks: {i: [0, 1, 2] for i in peaks})
    with pytest.raises(ValueError, match="method.protect keeps 3 of experts"):
        run_method(tiny_model("qwen3_moe"), {"name": "aimer", "protect": "super"}, ids, mask, ratio=0.75)
    with pytest.raises(ValueError, match=r"method.protect keeps 3 experts of 8 apart, but only 2 groups"):
        run_method(tiny_model("qwen3_moe"), {**method_cfg("m_smoe"), "protect": "super"}, ids, mask, ratio=0.75)


# ---- analysis: variants are methods of their own ---------------------------------------------------------

def test_analysis_names_score_variants_from_their_settings():
    from analysis.naming import method_label, method_name

    assert method_name("ream", method_cfg("ream")) == "ream"  # the preset as it is
    assert method_name("ream_freq_saliency", method_cfg("ream_freq_saliency")) == "ream_freq_saliency"
    assert method_name("ream", method_cfg("ream", "method.saliency=aimer")) == "ream+aimer"
    assert method_name("m_smoe", method_cfg("m_smoe")) == "m_smoe"
    assert method_name("m_smoe", method_cfg("m_smoe", "+method.saliency=man")) == "m_smoe+man"
    assert method_name("reap", method_cfg("reap", "+method.protect=super")) == "reap+super"
    assert method_name("aimer", method_cfg("aimer", "method.protect=super")) == "aimer+super"
    assert method_name("aimer", method_cfg("aimer")) == "aimer" and method_name("none", None) == "none"
    assert method_label("ream+aimer+super") == "REAM (AIMER, super experts kept)"
    assert method_label("router_norm") == "Router norm"


# ---- settings: checked before any load; what a run reads -----------------------------------------------

BAD = [
    (["method=ream", "method.saliency=aimr"], r"^method.saliency='aimr'; valid: reap, freq, man, msan, aimer, "
                                              r"router_norm \(did you mean aimer\?\)$"),
    (["method=aimer", "method.protect=all"], r"^method.protect='all'; valid: none, super"),
    (["method=man", "+method.saliency=reap"],
     r"^unknown setting method.saliency \(method=man\); allowed: name, protect$"),
    (["method=m_smoe", "+method.saliency=ean"], r"^method.saliency='ean'; valid: reap, freq"),
    (["method=msan", "method.protect=super", "model.stream=true", "save=true"],
     r"^method.protect=super needs every MoE layer's statistics at once"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_score_settings_are_one_line_before_any_load(overrides, message, tiny_checkpoint, calib_files,
                                                         tmp_path, no_model_load):  # noqa: F811
    cfg = _toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        run_module.run(cfg, tmp_path / "run")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name,protection,reads", [("aimer", "none", False), ("router_norm", "none", False),
                                                   ("aimer", "super", True), ("man", "none", True)])
def test_only_methods_that_observe_read_calibration_sources(name, protection, reads, tiny_checkpoint, calib_files,
                                                            tmp_path, monkeypatch):
    """A weights-only run validates with missing calibration files and builds no calibration tokens."""
    for unrelated in ("check_tasks", "check_runtime_data"):  # the eval's checks (lm-eval's task index: slow)
        monkeypatch.setattr(run_module, unrelated, lambda *a, **k: None)
    cfg = _toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, f"method={name}", f"method.protect={protection}",
                        *[f"calib.sources.{d}.path={tmp_path / 'missing.jsonl'}" for d in calib_files])
    if reads:
        with pytest.raises(ConfigError, match="missing.jsonl"):
            run_module.validate(cfg)
    else:
        run_module.validate(cfg)
        assert run_module._calibrate(cfg, get_method(name), lambda: pytest.fail("tokenizer used"), None) is None


@pytest.mark.parametrize("name", ["aimer", "router_norm", "man"])
def test_group_limited_routers_keep_their_groups_with_protected_experts(name, monkeypatch):
    from tests.test_router_groups import _balanced, _calib as _grouped_calib, _ctx as _grouped_ctx, _grouped_model

    model = _grouped_model(topk_group=1)
    _, _, calib = _grouped_calib()
    free = get_method(name).plan(_grouped_ctx(model, calib, 0.5, name, protect="none"))
    dropped = {lp.layer: lp.removed[0] for lp in free.layers}
    _weakest_protected(monkeypatch, dropped.get)
    plan = get_method(name).plan(_grouped_ctx(model, calib, 0.5, name, protect="super"))
    for lp in plan.layers:
        assert dropped[lp.layer] in lp.keep and _balanced(lp.keep) and len(lp.keep) == 8
    apply_plan(model, plan)
