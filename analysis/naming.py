"""Names shared by the analysis modules: calibration-mix labels (ream_exp.mix_labels, where the runs
write them too) and method display labels. Library module; no command.
"""

from ream_exp.mix_labels import MIX_PARTS, format_mix, format_ratio, mix_weights, other_sources, parse_mix

__all__ = ["MIX_PARTS", "METHOD_LABELS", "format_mix", "format_ratio", "method_label", "mix_weights",
           "other_sources", "parse_mix"]

# Registry names -> the labels the paper prints. Unknown names are shown as they are.
METHOD_LABELS = {
    "none": "Original",
    "random": "Random",
    "freq": "Freq",
    "soft_freq": "Soft-Freq",
    "ean": "EAN",
    "reap": "REAP",
    "hc_smoe": "HC-SMoE",
    "m_smoe": "M-SMoE",
    "ream": "REAM",
    "ream_official": "REAM (official)",
}


def method_label(name) -> str:
    return METHOD_LABELS.get(str(name), str(name))
