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


def get_method(name: str) -> ModuleType:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "REAM_VARIANTS", "Context", "get_method", "prune_plan", "top_experts"]
