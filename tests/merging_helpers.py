"""Shared helpers of the merging tests (test_ream.py, test_merging_baselines.py, test_compositions.py); not a test
module."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ream_exp.methods import Context, get_method
from ream_exp.moe import apply_plan, canonical_weights, moe_layers
from ream_exp.moe.tiny import tiny_batch, tiny_model

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_fixtures(name: str = "qwen16", num_experts: int = 16, top_k: int = 4, layers: int = 3, seed: int = 1,
                  seq: int = 16, batch_seed: int = 3):
    """A test module's two module-scoped fixtures, `qwen16, batch = tiny_fixtures()`: `name`, a tiny Qwen3-MoE (by
    default 16 experts, top-4, norm_topk_prob; MoE layers 0 and 2 with a dense layer between), and `batch`, a
    tiny batch of 4 sequences of `seq` tokens."""

    @pytest.fixture(scope="module", name=name)
    def model():
        return tiny_model("qwen3_moe", num_experts=num_experts, top_k=top_k, layers=layers, seed=seed)

    @pytest.fixture(scope="module", name="batch")
    def batch():
        return tiny_batch(batch=4, seq=seq, seed=batch_seed)

    return model, batch


def method_cfg(name: str, *overrides: str) -> dict:
    """conf/method/<name>.yaml composed by Hydra (inheritance included), with `method.key=value` overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", *overrides])
    return OmegaConf.to_container(cfg.method, resolve=True)


def run_method(model, cfg: dict, ids, mask, ratio=0.5, batch_size=2, seed=0, apply=True):
    """Plan (and apply) a method on `model` in place, as the pipeline does; returns the Plan."""
    ctx = Context(model, {"input_ids": ids, "attention_mask": mask}, ratio, cfg, seed=seed,
                  batch_size=batch_size, progress=False)
    plan = get_method(cfg["name"]).plan(ctx)
    if apply:
        apply_plan(model, plan)
    return plan


def planned_copy(model, cfg, ids, mask, **kw):
    """A compressed deep copy of `model` and its plan (the original stays untouched)."""
    twin = copy.deepcopy(model)
    return twin, run_method(twin, cfg, ids, mask, **kw)


@torch.no_grad()
def moe_inputs(model, ids, mask) -> dict[int, torch.Tensor]:
    """The input [B*S, H] of every MoE block of `model` on one batch (pads included)."""
    seen, hooks = {}, []
    for layer in moe_layers(model):
        def grab(_m, args, index=layer.index):
            seen[index] = args[0].reshape(-1, args[0].shape[-1]).clone()
        hooks.append(layer.block.register_forward_pre_hook(grab))
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def expert_weights64(layer, e: int) -> dict:
    w = canonical_weights(layer.experts, [e])
    return {k: (None if v is None else v[0].double()) for k, v in w.items()}


def as_partition(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}
