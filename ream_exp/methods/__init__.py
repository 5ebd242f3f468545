"""Compression methods: one module per method, each with `plan(ctx) -> Plan` and NEEDS_CALIBRATION.

Dispatch happens once, through this registry; the pipeline never branches on a method's name.
"""

from __future__ import annotations

from types import ModuleType

from ..config import ConfigError
from . import ean, freq, hc_smoe, m_smoe, none, random_prune, reap, ream
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
# Merging as a composition (methods/compose.py): presets of grouping x alignment x merge operator, each one of the
# merging modules with the switches its conf/method/<name>.yaml sets (same `name`).
COMPOSED = {"ream_ties": ream, "ream_multislerp": ream, "ream_karcher": ream, "ream_sub_moe": ream,
            "hc_smoe_ties": hc_smoe, "hc_smoe_karcher": hc_smoe, "hc_smoe_sub_moe": hc_smoe, "m_smoe_ties": m_smoe,
            "m_smoe_multislerp": m_smoe}
METHODS.update(COMPOSED)


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


__all__ = ["COMPOSED", "METHODS", "REAM_VARIANTS", "Context", "get_method", "prune_plan", "top_experts"]
