"""Calibration mixes as labels: how runs, W&B names, sweeps and analysis write a mix.

A mix of the paper's three sources is written as in the paper, general:math:code with each ratio's
leading zero dropped (0:.3:.7, .2:.25:.55, 1:0:0). A mix with any other source (calib.mix as a mapping,
e.g. {general: 0.2, math: 0.3, code: 0.4, tool: 0.1}) is written with names, its positive weights only,
general, math, code first and the others by name: "general .2, math .3, code .4, tool .1". Both labels
parse back (parse_mix, mix_weights).
"""

import math

MIX_PARTS = ("general", "math", "code")


def format_ratio(ratio) -> str:
    """0 -> '0', 0.3 -> '.3', 0.25 -> '.25', 1 -> '1' (rounded to 4 decimals)."""
    value = round(float(ratio), 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    if value == int(value):
        return str(int(value))
    text = f"{value:g}"
    return text[1:] if text.startswith("0.") else text


def mix_weights(mix) -> dict[str, float] | None:
    """A mix as {source: weight}: from a mapping, a [general, math, code] list, or either label; None when
    missing. general, math and code come first, other sources after them by name."""
    if mix is None or (isinstance(mix, float) and math.isnan(mix)):
        return None
    if isinstance(mix, str) and ":" not in mix:  # "general .2, math .3, tool .5"
        pairs = [part.split() for part in mix.split(",") if part.strip()]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"a mix label is 'a:b:c' or 'source weight, source weight, ...', got {mix!r}")
        mix = {name: value for name, value in pairs}
    if isinstance(mix, dict):
        weights = {str(name): float(value) for name, value in mix.items()}
        order = {part: i for i, part in enumerate(MIX_PARTS)}
        return dict(sorted(weights.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    values = tuple(float(v) for v in (mix.split(":") if isinstance(mix, str) else mix))
    if len(values) != len(MIX_PARTS):
        raise ValueError(f"a mix has {len(MIX_PARTS)} ratios (general:math:code) or is a mapping, got {mix!r}")
    return dict(zip(MIX_PARTS, values))


def parse_mix(mix):
    """A mix (a list, a mapping or a label) -> its (general, math, code) weights, 0 for a source it does
    not read, or None. Other sources' weights are in mix_weights(mix)."""
    weights = mix_weights(mix)
    return None if weights is None else tuple(weights.get(part, 0.0) for part in MIX_PARTS)


def other_sources(mix) -> dict[str, float]:
    """{source: weight} of the mix's sources beyond general, math and code."""
    return {name: w for name, w in (mix_weights(mix) or {}).items() if name not in MIX_PARTS}


def format_mix(mix) -> str | None:
    """'0:.3:.7' for a mix of general, math and code; 'general .2, math .3, tool .5' when it reads
    any other source (zero weights left out: they take no sequences)."""
    weights = mix_weights(mix)
    if weights is None:
        return None
    if not any(w for name, w in weights.items() if name not in MIX_PARTS):
        return ":".join(format_ratio(weights.get(part, 0.0)) for part in MIX_PARTS)
    return ", ".join(f"{name} {format_ratio(w)}" for name, w in weights.items() if w)
