"""Tolerances of float32 comparisons, derived from the arithmetic instead of from what passed once.

The rule. Two float32 computations of the same quantity that sum the same terms in another order (another
CPU's BLAS blocking, another kernel, a sliced weight matrix, our observing forward against the model's)
differ only by rounding. A sum of n terms rounds once per addition, each time by at most u = eps32 / 2 of
the partial sum; modelled as independent errors (a random walk, which is what other orders give in
practice: the worst case n * u is never approached) their total has a standard deviation of about
u * sqrt(n / 3) times the size S of the partial sums, and the difference of two such computations
sqrt(2) times that, ~0.4 * eps32 * sqrt(n) * S. We allow 4 * eps32 * sqrt(n) * S (about ten standard
deviations, so one tensor of thousands of elements does not fail by chance) per chained reduction
("stage": a matmul, a decoder layer, a sum over tokens), since every stage adds its own rounding to the
error it inherits. S is taken as max |reference| of the compared tensor: the partial sums are of the size
of the results when the terms have random signs; where they cancel strongly (a result much smaller than
its terms) pass the size of the terms as `scale` instead. Comparisons against a float64 reference round on
one side only, so the same bound holds with margin. Comparisons that are exact by construction (the same
arithmetic on the same numbers: a reload, a copy, a no-op plan) stay `torch.equal`/`rtol=0, atol=0`.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: spacing of float32 numbers at 1
SAFETY = 4.0  # ~10 standard deviations of the difference of two summation orders (see above)


def f32_atol(scale, terms: int, stages: int = 1) -> float:
    """Absolute tolerance for float32 results of `stages` chained sums of `terms` terms each, of size `scale`
    (a tensor: its max |.|; or a number)."""
    size = float(scale.detach().abs().max()) if isinstance(scale, torch.Tensor) else float(abs(scale))
    return SAFETY * stages * EPS32 * math.sqrt(terms) * size


def assert_f32_close(actual, expected, terms: int, stages: int = 1, scale=None, msg=None) -> None:
    """assert_close with atol = f32_atol(scale or expected, terms, stages) and no relative part."""
    atol = f32_atol(expected if scale is None else scale, terms, stages)
    label = None if msg is None else (lambda details: f"{msg}: {details}")  # keep torch's mismatch report
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=label)
