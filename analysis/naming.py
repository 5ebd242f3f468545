"""Names shared by the analysis modules: calibration-mix strings and method display labels.

A mix is written as in the paper, general:math:code with each ratio's leading zero dropped
(0:.3:.7, .2:.25:.55, 1:0:0). Library module; no command.
"""

import math

MIX_PARTS = ("general", "math", "code")

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


def format_ratio(ratio) -> str:
    """0 -> '0', 0.3 -> '.3', 0.25 -> '.25', 1 -> '1' (rounded to 4 decimals)."""
    value = round(float(ratio), 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    if value == int(value):
        return str(int(value))
    text = f"{value:g}"
    return text[1:] if text.startswith("0.") else text


def parse_mix(mix):
    """A mix given as a list, a dict or a 'a:b:c' string -> (general, math, code) floats, or None."""
    if mix is None or (isinstance(mix, float) and math.isnan(mix)):
        return None
    if isinstance(mix, dict):
        mix = [mix.get(part, 0.0) for part in MIX_PARTS]
    elif isinstance(mix, str):
        mix = mix.split(":")
    values = tuple(float(v) for v in mix)
    if len(values) != len(MIX_PARTS):
        raise ValueError(f"a mix has {len(MIX_PARTS)} ratios (general:math:code), got {mix!r}")
    return values


def format_mix(mix) -> str | None:
    values = parse_mix(mix)
    return None if values is None else ":".join(format_ratio(v) for v in values)
