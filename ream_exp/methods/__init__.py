"""Compression methods: one module per method, each with `plan(ctx) -> Plan` and NEEDS_CALIBRATION.

Dispatch happens once, through this registry; the pipeline never branches on a method's name.
"""

from __future__ import annotations

from types import ModuleType

from ..config import ConfigError
from . import aimer, ean, freq, hc_smoe, m_smoe, man, msan, none, random_prune, reap, ream, router_norm
from .base import Context, prune_plan, top_experts

METHODS: dict[str, ModuleType] = {
    "none": none,
    "random": random_prune,
    "freq": freq,
    "freq_official": freq,  # freq with saliency_form=official, sequential=true (conf/method/freq_official.yaml)
    "ean": ean,
    "reap": reap,
    "reap_official": reap,  # reap with saliency_form=official, sequential=true (conf/method/reap_official.yaml)
    "hc_smoe": hc_smoe,
    "m_smoe": m_smoe,
}
# REAM's presets and ablations: one implementation, one conf/method/<name>.yaml each (same `name`).
REAM_VARIANTS = ("ream", "ream_official", "ream_act_only_align", "ream_nonseq", "ream_no_gate_sim",
                 "ream_no_pseudo_prune", "ream_no_sigma", "ream_freq_saliency")
METHODS.update({name: ream for name in REAM_VARIANTS})
# Scores without calibration data (aimer, router_norm) and gate-free activation norms (man, msan): pruning presets.
METHODS.update({"aimer": aimer, "router_norm": router_norm, "man": man, "msan": msan})


# Merging as a composition (methods/compose.py): presets of grouping x alignment x merge operator, each one of the
# merging modules with the switches its conf/method/<name>.yaml sets (same `name`).
COMPOSED = {"ream_ties": ream, "ream_multislerp": ream, "ream_karcher": ream, "ream_sub_moe": ream,
            "hc_smoe_ties": hc_smoe, "hc_smoe_karcher": hc_smoe, "hc_smoe_sub_moe": hc_smoe, "m_smoe_ties": m_smoe,
            "m_smoe_multislerp": m_smoe}
METHODS.update(COMPOSED)


def reads_calibration(module: ModuleType, cfg: dict | None) -> bool:
    """Whether a run of this method (with its config group `cfg`) builds calibration tokens: its module's
    `needs_calibration(cfg)` where it depends on the settings (aimer with method.protect), else its
    NEEDS_CALIBRATION (an unknown method does)."""
    decide = getattr(module, "needs_calibration", None)
    if decide is not None and isinstance(cfg, dict):
        return bool(decide(cfg))
    return getattr(module, "NEEDS_CALIBRATION", True)


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


__all__ = ["COMPOSED", "METHODS", "REAM_VARIANTS", "Context", "get_method", "prune_plan", "reads_calibration",
           "top_experts"]
