"""The mix search's arithmetic: points on the simplex of calibration sources, their grid, their override.

The search sweeper (hydra_plugins/ream_mix_search) asks optuna for K-1 numbers in [0, 1] per trial and
turns them into a mix over K sources here:

  simplex_weights(u)        stick-breaking with Beta(1, K-1-i) quantiles: uniform u in the cube gives a
                            uniform point on the simplex (each weight >= 0, sum 1);
  round_to_grid(w, units)   the nearest mix whose weights are multiples of 1/units (largest remainders),
                            so run directories read as 0.3, 0.45 ... and equal mixes are recognised;
  mix_override(mix)         the Hydra override that sets calib.mix to it;
  objectives(metrics)       (MC, GEN) from a run's metrics, the two values the search maximises.
"""

from __future__ import annotations

import math

from .config import ConfigError, shown


def grid_units(step) -> int:
    """1/step as an integer: the number of grid units a mix's weights are shared out in."""
    try:
        step = float(step)
    except (TypeError, ValueError):
        raise ConfigError(f"hydra.sweeper.step={shown(step)} is not a number: it is the grid of mix weights, "
                          "1/step a whole number, e.g. 0.1 or 0.05") from None
    units = round(1 / step) if 0 < step <= 1 else 0
    if units < 1 or abs(units * step - 1) > 1e-9:
        raise ConfigError(f"hydra.sweeper.step={shown(step)}: the grid of mix weights needs 0 < step <= 1 with "
                          "1/step a whole number, e.g. 0.1 or 0.05")
    return units


def grid_size(n_sources: int, units: int) -> int:
    """How many mixes the grid holds: the ways to share `units` units among `n_sources` sources."""
    return math.comb(units + n_sources - 1, n_sources - 1)


def simplex_weights(u) -> list[float]:
    """K-1 numbers in [0, 1] -> K non-negative weights summing to 1.

    Weight i takes the share 1 - (1 - u_i)^(1/(K-1-i)) of what is left: the quantile of Beta(1, K-1-i),
    the law of that share under the uniform law on the simplex, so uniform u map to uniform mixes."""
    k = len(u) + 1
    rest, weights = 1.0, []
    for i, ui in enumerate(u):
        share = 1.0 - (1.0 - min(max(float(ui), 0.0), 1.0)) ** (1.0 / (k - 1 - i))
        weights.append(rest * share)
        rest -= rest * share
    weights.append(max(rest, 0.0))
    return weights


def simplex_params(units_per_source, units: int) -> list[float]:
    """The K-1 numbers whose simplex_weights are units_per_source / units: simplex_weights inverted."""
    k, left, params = len(units_per_source), units, []
    for i in range(k - 1):
        share = units_per_source[i] / left if left else 0.0
        params.append(1.0 - (1.0 - share) ** (k - 1 - i))
        left -= units_per_source[i]
    return params


def round_to_grid(weights, units: int) -> tuple[int, ...]:
    """Whole units per source summing to `units`, each within one unit of weight * units.

    Floors first, then the units left go to the largest remainders (ties to the first source)."""
    total = sum(weights)
    scaled = [w / total * units for w in weights]
    floors = [math.floor(x) for x in scaled]
    order = sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - floors[i]), i))
    for i in order[:units - sum(floors)]:
        floors[i] += 1
    return tuple(floors)


def mix_from_units(sources, units_per_source, units: int) -> dict[str, float]:
    """{source: weight} with each weight units_i / units, written with at most 6 decimals."""
    return {s: round(n / units, 6) for s, n in zip(sources, units_per_source)}


def _number(x: float) -> str:
    return f"{x:g}"


def mix_override(mix: dict[str, float]) -> str:
    """The override that sets calib.mix to `mix` ({source: weight}), e.g. calib.mix={general:0.2,code:0.8}."""
    return "calib.mix={" + ",".join(f"{s}:{_number(w)}" for s, w in mix.items()) + "}"


def mix_label(mix: dict[str, float]) -> str:
    """'general=0.2,math=0.3,code=0.5': the key under which a study records a mix."""
    return ",".join(f"{s}={_number(w)}" for s, w in mix.items())


def objectives(metrics) -> tuple[float, float]:
    """(MC, GEN) of a finished run's metrics; ValueError naming what is missing otherwise."""
    if not isinstance(metrics, dict) or metrics.get("status") != "done":
        raise ValueError("the run returned no finished metrics")
    scores = metrics.get("eval") or {}
    missing = [suite for suite in ("mc", "gen") if not isinstance(scores.get(suite), (int, float))]
    if missing:
        raise ValueError(f"the run's eval has no {' and no '.join(missing).upper()} score: the search needs "
                         "an eval with both MC and GEN tasks")
    return float(scores["mc"]), float(scores["gen"])
