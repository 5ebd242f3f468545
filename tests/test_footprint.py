"""Weight bytes measured on the checkpoint's files, experts' bytes, total and active parameters
(ream_exp/footprint.py, docs/bytes.md), checked against independent counts."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from ream_exp.footprint import StoredExperts, checkpoint_footprint, model_footprint, parameter_counts
from ream_exp.moe import canonical_weights, keep_experts, moe_layers
from ream_exp.moe.tiny import tiny_model, tiny_model_of
from tests.test_config import make_cfg

EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")  # a Qwen3-MoE checkpoint's per-expert tensor names


def _files(directory):
    return sorted(directory.glob("*.safetensors"))


def _tensor_bytes(directory, keep=lambda name: True) -> int:
    """Sum over the tensors safe_open reads from the directory's files: numel x element size."""
    total = 0
    for path in _files(directory):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if keep(name):
                    t = f.get_tensor(name)
                    total += t.numel() * t.element_size()
    return total


def test_run_records_measured_bytes(tiny_checkpoint, tmp_path):
    """metrics.json's bytes are those of the files written (compressed checkpoint and original model);
    save=false computes the same from the model in memory and says so."""
    from ream_exp.run import run

    cfg = lambda *extra: make_cfg("model=local", f"model.path={tiny_checkpoint}", "method=random", "ratio=0.5",
                                  "eval=none", "logger=none", f"cache_dir={tmp_path / 'cache'}", "progress=false",
                                  *extra)
    saved = run(cfg(), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["weights"] == saved["weights"]
    weights, before = saved["weights"], saved["weights_before"]
    checkpoint = tmp_path / "run" / "checkpoint"
    assert weights["measured"] == "disk" and before["measured"] == "disk"
    assert weights["bytes"] == _tensor_bytes(checkpoint)
    assert weights["expert_bytes"] == _tensor_bytes(checkpoint, EXPERT.search)
    assert before["bytes"] == _tensor_bytes(tiny_checkpoint)
    assert before["expert_bytes"] == _tensor_bytes(tiny_checkpoint, EXPERT.search)
    assert weights["params"] == saved["params_after"] and before["params"] == saved["params_before"]
    assert saved["peak_memory_bytes"] is None  # CPU

    unsaved = run(cfg("save=false"), tmp_path / "unsaved")
    assert unsaved["weights"] == {**weights, "measured": "memory"}
    assert unsaved["weights_before"] == before


def test_pruning_removes_exactly_the_experts_bytes(tmp_path):
    """Pruned: expert bytes smaller by the removed experts' tensors in the original files, total bytes by
    those and the router rows of the removed experts; parameters likewise."""
    model = tiny_model("qwen3_moe", num_experts=8, top_k=2, layers=2)
    model.save_pretrained(tmp_path / "full")
    full = checkpoint_footprint(tmp_path / "full", model)
    keep = [0, 2, 3, 6, 7]
    layers = moe_layers(model)
    hidden = layers[0].router.weight.shape[1]
    for layer in layers:
        keep_experts(layer, keep)
    model.save_pretrained(tmp_path / "pruned")
    pruned = checkpoint_footprint(tmp_path / "pruned", model)

    removed = lambda name: (m := EXPERT.search(name)) is not None and int(m.group(1)) not in keep
    removed_bytes = _tensor_bytes(tmp_path / "full", removed)
    router_rows = len(layers) * (8 - len(keep)) * hidden
    assert removed_bytes > 0
    assert full["expert_bytes"] - pruned["expert_bytes"] == removed_bytes
    assert full["bytes"] - pruned["bytes"] == removed_bytes + router_rows * 4  # float32 router rows
    assert full["expert_params"] - pruned["expert_params"] == removed_bytes // 4
    assert full["params"] - pruned["params"] == removed_bytes // 4 + router_rows
    assert pruned == {**model_footprint(model), "measured": "disk"}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen2_moe", "mixtral"])
def test_active_params_are_what_one_token_reads(family):
    """active_params = the parameters one token's forward pass reads: every parameter outside the routed
    experts, plus the experts the router picks in each MoE layer (counted one by one)."""
    model = tiny_model(family, num_experts=8, top_k=2, layers=3).eval()
    layers = moe_layers(model)
    chosen = {}

    def record(module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        chosen[id(module)] = set(index.reshape(-1).tolist())

    hooks = [layer.experts.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]))
    for hook in hooks:
        hook.remove()
    inside = {id(p) for layer in layers for p in layer.experts.parameters()}
    read = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    for layer in layers:
        picked = chosen[id(layer.experts)]
        assert len(picked) == layer.top_k
        read += sum(w.numel() for e in picked for w in canonical_weights(layer.experts, [e]).values()
                    if w is not None)
    counts = parameter_counts(model)
    assert counts["active_params"] == read
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < counts["active_params"] < counts["params"]


@pytest.mark.parametrize("family, extra", [("qwen3_moe", {"tie_word_embeddings": True}), ("mixtral", {}),
                                           ("deepseek_v3", {}), ("granitemoe", {}), ("laguna", {})])
def test_memory_and_disk_agree(family, extra, tmp_path):
    """Bytes computed from the model equal those measured on its saved files (tied weights once; Mixtral's
    experts under their saved names, Granite's as two block tensors beside the router, Laguna's router bias
    saved under the experts' name); params count every parameter once."""
    model = tiny_model_of(family, num_experts=8, top_k=2, **extra)
    model.save_pretrained(tmp_path)
    measured = checkpoint_footprint(tmp_path, model)
    assert measured == {**model_footprint(model), "measured": "disk"}
    assert measured["bytes"] == _tensor_bytes(tmp_path)
    assert measured["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < measured["expert_bytes"] < measured["bytes"]


def test_peak_memory_is_the_gpus_peak_since_the_reset(monkeypatch):
    """reset_peak_memory resets every GPU's peak; peak_memory sums their max_memory_allocated; None without
    CUDA."""
    from ream_exp import footprint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    footprint.reset_peak_memory()
    assert footprint.peak_memory() is None
    reset, peaks = [], {0: 300, 1: 200}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", peaks.__getitem__)
    footprint.reset_peak_memory()
    assert reset == [0, 1] and footprint.peak_memory() == 500


def test_stored_names_a_conversion_does_not_give_are_classed_by_module():
    """A quantised checkpoint's extra tensors (weight_packed, weight_scale of per-expert Linears) are the
    experts' by their module, in the saved naming (Mixtral's w1) or the model's; the router's are not."""
    experts = StoredExperts(tiny_model("mixtral", num_experts=8, top_k=2, layers=2))
    assert experts.layer_of("model.layers.1.block_sparse_moe.experts.3.w1.weight_scale") == 1
    assert experts.layer_of("model.layers.0.mlp.experts.3.gate_proj.weight_packed") == 0
    assert experts.layer_of("model.layers.0.block_sparse_moe.gate.weight") is None
    assert experts.layer_of("model.layers.0.block_sparse_moe.gate.weight_scale") is None
    assert experts.layer_of("model.layers.0.self_attn.q_proj.weight_packed") is None
