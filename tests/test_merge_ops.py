"""The merge operators (docs/algorithms.md, "Merge operators") against brute-force references computed another way
(float64 loops, slerp's closed form, a direct search on the sphere, the projector onto the joint SVD's left
basis), and their invariants: one member is the identity, identical members merge back into the expert, only the
weights' ratios matter, permuted identical copies merged through surgery give the centroid back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from ream_exp.moe import canonical_weights, moe_layers
from ream_exp.moe.merge_ops import MERGE_OPERATORS, OPERATORS, merge_tensor, normalised
from ream_exp.moe.surgery import merge_group
from ream_exp.moe.tiny import tiny_model
from tests.test_ream import _permute_expert

OPS = {"average": {}, "ties": {"merge_density": 0.3}, "multislerp": {}, "karcher": {}, "sub_moe": {}}


def members(k=3, shape=(4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, *shape, generator=g, dtype=torch.float64)


def weights(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return normalised(torch.rand(k, generator=g, dtype=torch.float64) + 0.1)


# ---- TIES -----------------------------------------------------------------------------------------------

def ties_loops(t: np.ndarray, w: np.ndarray, density: float) -> np.ndarray:
    """TIES entry by entry: task vectors from the centroid, top ceil(d n) by |.| per member, elected sign,
    weighted disjoint mean."""
    k = len(t)
    flat = t.reshape(k, -1).tolist()
    n = len(flat[0])
    tau = [[flat[i][p] - flat[0][p] for p in range(n)] for i in range(k)]
    kept = [[0.0] * n for _ in range(k)]
    m = math.ceil(density * n)
    for i in range(k):
        order = sorted(range(n), key=lambda p: -abs(tau[i][p]))
        for p in order[:m]:
            kept[i][p] = tau[i][p]
    out = list(flat[0])
    for p in range(n):
        total = sum(float(w[i]) * kept[i][p] for i in range(k))
        sign = (total > 0) - (total < 0)
        num = den = 0.0
        for i in range(k):
            if sign != 0 and ((kept[i][p] > 0) - (kept[i][p] < 0)) == sign:
                num += float(w[i]) * kept[i][p]
                den += float(w[i])
        out[p] += num / den if den > 0 else 0.0
    return np.array(out).reshape(t.shape[1:])


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("k", [2, 4])
def test_ties_matches_entry_loops(density, k):
    t, w = members(k, (6, 5), seed=k), weights(k, seed=k)
    got = OPERATORS["ties"](t, w, merge_density=density)
    want = ties_loops(t.numpy(), w.numpy(), density)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-14)


def test_ties_moves_towards_the_members_not_away():
    """The task vector is W_i - W_c (the TIES paper's sign): one member, full density, gives that member."""
    t, w = members(2), weights(2)
    torch.testing.assert_close(OPERATORS["ties"](t, w, merge_density=1.0), t[1], rtol=0, atol=1e-15)


# ---- multislerp and Karcher --------------------------------------------------------------------------

def slerp(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """Shoemake's slerp of the directions, scaled by the interpolated norm."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    theta = math.acos(float(np.clip(ua.ravel() @ ub.ravel(), -1, 1)))
    d = (math.sin((1 - s) * theta) * ua + math.sin(s * theta) * ub) / math.sin(theta)
    return ((1 - s) * na + s * nb) * d


@pytest.mark.parametrize("op", ["multislerp", "karcher"])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.8])
def test_two_members_give_slerp(op, s):
    t = members(2, (3, 4), seed=5)
    got = OPERATORS[op](t, torch.tensor([1 - s, s], dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), slerp(t[0].numpy(), t[1].numpy(), s), rtol=0, atol=1e-12)


def sphere_angle(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between unit vectors, atan2 form (no arccos)."""
    return math.atan2(np.linalg.norm(np.cross(u, v)), float(u @ v))


def karcher_by_search(units: np.ndarray, w: np.ndarray) -> np.ndarray:
    """argmin_u sum_i w_i angle(u, u_i)^2 on S^2: a grid over spherical coordinates, refined by Nelder-Mead."""
    def point(a):
        th, ph = a
        return np.array([math.sin(th) * math.cos(ph), math.sin(th) * math.sin(ph), math.cos(th)])

    def cost(a):
        p = point(a)
        return sum(wi * sphere_angle(p, ui) ** 2 for wi, ui in zip(w, units))

    grid = [(th, ph) for th in np.linspace(0.01, math.pi - 0.01, 60) for ph in np.linspace(-math.pi, math.pi, 120)]
    start = min(grid, key=cost)
    best = minimize(cost, start, method="Nelder-Mead", options=dict(xatol=1e-12, fatol=1e-16, maxiter=20000))
    return point(best.x)


@pytest.mark.parametrize("seed", range(3))
def test_karcher_is_the_weighted_frechet_mean_on_the_sphere(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(4, 3, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    w = weights(4, seed)
    got = OPERATORS["karcher"](t, w).numpy()
    norms = t.norm(dim=1).numpy()
    scale = float(w.numpy() @ norms)
    assert abs(np.linalg.norm(got) - scale) < 1e-12
    want = karcher_by_search((t / t.norm(dim=1, keepdim=True)).numpy(), w.numpy())
    np.testing.assert_allclose(got / scale, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_multislerp_is_one_tangent_step_from_the_normalised_mean(seed):
    """Recomputed with atan2 angles and explicit loops over the members."""
    t, w = members(3, (2, 3), seed), weights(3, seed)
    flat = t.reshape(3, -1).numpy()
    units = [f / np.linalg.norm(f) for f in flat]
    m = sum(wi * u for wi, u in zip(w.numpy(), units))
    m = m / np.linalg.norm(m)
    step = np.zeros_like(m)
    for wi, u in zip(w.numpy(), units):
        perp = u - (u @ m) * m
        angle = math.atan2(np.linalg.norm(perp), float(u @ m))
        step += wi * angle * perp / np.linalg.norm(perp)
    n = np.linalg.norm(step)
    direction = math.cos(n) * m + math.sin(n) * step / n
    want = float(w.numpy() @ np.linalg.norm(flat, axis=1)) * direction
    np.testing.assert_allclose(OPERATORS["multislerp"](t, w).numpy().ravel(), want, rtol=0, atol=1e-13)


def test_karcher_refines_multislerp_with_three_members():
    t, w = members(3, (2, 3), seed=4), weights(3, seed=4)
    multi, mean = OPERATORS["multislerp"](t, w), OPERATORS["karcher"](t, w)
    assert not torch.allclose(multi, mean, rtol=0, atol=1e-9)  # one step is not the fixed point
    once_more = OPERATORS["karcher"](t, w, merge_tol=1e-13)
    torch.testing.assert_close(mean, once_more, rtol=0, atol=1e-10)


def test_karcher_refuses_when_it_has_not_converged():
    t, w = members(3, (2, 3), seed=4), weights(3, seed=4)
    with pytest.raises(RuntimeError, match="merge_max_iter=1"):
        OPERATORS["karcher"](t, w, merge_tol=1e-30, merge_max_iter=1)


# ---- Sub-MoE ----------------------------------------------------------------------------------------

def sub_moe_by_projection(t: np.ndarray, w: np.ndarray, rank: int) -> np.ndarray:
    """U_r diag(S_r) sum_i w_i V_i^T = U_r U_r^T sum_i w_i W_i, with U_r from the eigenvectors of A A^T."""
    joint = np.concatenate(list(t), axis=1)
    vals, vecs = np.linalg.eigh(joint @ joint.T)
    u = vecs[:, np.argsort(vals)[::-1][:rank]]
    return u @ u.T @ sum(wi * ti for wi, ti in zip(w, t))


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_sub_moe_is_the_weighted_average_projected_on_the_shared_basis(rank):
    t, w = members(3, (5, 4), seed=rank), weights(3, seed=rank)
    got = OPERATORS["sub_moe"](t, w, merge_rank=rank)
    np.testing.assert_allclose(got.numpy(), sub_moe_by_projection(t.numpy(), w.numpy(), rank), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [None, 5, 99])
def test_sub_moe_at_full_rank_is_the_weighted_average(rank):
    t, w = members(3, (5, 4), seed=7), weights(3, seed=7)
    torch.testing.assert_close(OPERATORS["sub_moe"](t, w, merge_rank=rank), OPERATORS["average"](t, w),
                               rtol=0, atol=1e-13)


def test_sub_moe_does_not_depend_on_the_members_order():
    t, w = members(3, (5, 4), seed=8), weights(3, seed=8)
    order = [2, 0, 1]
    torch.testing.assert_close(OPERATORS["sub_moe"](t, w, merge_rank=2),
                               OPERATORS["sub_moe"](t[order], w[order], merge_rank=2), rtol=0, atol=1e-12)


def test_sub_moe_averages_biases():
    t, w = members(3, (5,), seed=9), weights(3, seed=9)
    torch.testing.assert_close(OPERATORS["sub_moe"](t, w, merge_rank=1), OPERATORS["average"](t, w))


# ---- invariants of every operator ---------------------------------------------------------------------

@pytest.mark.parametrize("name", MERGE_OPERATORS)
def test_one_member_is_the_identity(name):
    t = members(1, (4, 6), seed=2)
    torch.testing.assert_close(merge_tensor(t, [0.7], {"op": name, **OPS[name]})[0], t[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", MERGE_OPERATORS)
def test_identical_members_merge_back_into_the_expert(name):
    t = members(1, (4, 6), seed=3).expand(3, 4, 6).clone()
    got = merge_tensor(t, [0.2, 0.5, 0.3], {"op": name, **OPS[name]})[0]
    torch.testing.assert_close(got, t[0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", MERGE_OPERATORS)
def test_only_the_ratios_of_the_weights_matter(name):
    t = members(3, (4, 6), seed=4)
    a = merge_tensor(t, [1.0, 2.0, 3.0], {"op": name, **OPS[name]})
    b = merge_tensor(t, [1 / 6, 2 / 6, 3 / 6], {"op": name, **OPS[name]})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("bad", [[0.0, 0.0], [1.0, -0.5]])
def test_weights_must_be_non_negative_with_a_positive_sum(bad):
    with pytest.raises(ValueError, match="merge weights"):
        normalised(bad)


@pytest.mark.parametrize("name", MERGE_OPERATORS)
def test_permuted_identical_copies_merge_back_into_the_centroid(name):
    """Through surgery: experts 4 and 6 are neuron-permuted copies of expert 1; with the permutations that
    undo it, every operator gives expert 1 back (float32 weights, float64 arithmetic)."""
    layer = moe_layers(tiny_model("mixtral", num_experts=8, top_k=2, layers=1, seed=3))[0]
    before = {k: v for k, v in canonical_weights(layer.experts, [1]).items() if v is not None}
    perms = {}
    for j, seed in ((4, 5), (6, 6)):
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
        _permute_expert(layer, 1, j, perm)
        perms[j] = torch.argsort(perm).tolist()
    merge_group(layer, [1, 4, 6], [0.5, 0.3, 0.2], perms, {"op": name, **OPS[name]})
    after = canonical_weights(layer.experts, [1])
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-6, atol=1e-7)
