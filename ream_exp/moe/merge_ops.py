"""Merge operators: one group's aligned expert tensors -> the one tensor its surviving expert gets.

docs/algorithms.md, "Merge operators", states each formula and its source. Every operator takes the stack of
one weight tensor of a group's members, t [k, ...] (member 0 the centroid, the others' neurons already
permuted onto it), and their merge weights w [k] (normalised here to sum to 1), and returns [...]:

    average      sum_i w_i W_i                                                     (REAM 5; bits: surgery.py)
    ties         W_c + disjoint_mean_i(trim_d(W_i - W_c))  sign elected by sum_i w_i tau_i   (TIES)
    multislerp   |W| * exp_m(sum_i w_i log_m(u_i)),  m = sum_i w_i u_i / |.|,  u_i = W_i / |W_i|
    karcher      |W| * argmin_u sum_i w_i d(u, u_i)^2 on the sphere (fixed point iteration to tol)
                 with |W| = sum_i w_i |W_i| (Frobenius norms) in both
    sub_moe      U_r diag(S_r) sum_i w_i V_i^T,  [W_1 | ... | W_k] = U S [V_1^T | ... | V_k^T]  (Sub-MoE)
                 r = merge rank: null full, an integer, or a fraction of the joint matrix's full rank

Each works on one tensor (a matrix or a bias) in float64; sub_moe factorises matrices only and averages biases.
"""

from __future__ import annotations

import math

import torch

MERGE_OPERATORS = ("average", "ties", "multislerp", "karcher", "sub_moe")
# The operators' settings and defaults (method.merge_density, ...): TIES keeps the top 20% of each task vector
# (the TIES paper's k = 20); the Karcher iteration stops when its tangent step is below tol radians.
MERGE_DEFAULTS = dict(merge_density=0.2, merge_rank=None, merge_tol=1e-10, merge_max_iter=100)
MERGE_PARAMS = dict(ties=("merge_density",), sub_moe=("merge_rank",), karcher=("merge_tol", "merge_max_iter"),
                    multislerp=(), average=())
# |sum_i w_i u_i| below this: the members' directions cancel (antipodal), a spherical mean is undefined.
ANTIPODAL = 1e-12


def normalised(w) -> torch.Tensor:
    """w / sum(w) in float64; weights must be >= 0 with a positive sum."""
    w = torch.as_tensor(w, dtype=torch.float64)
    total = float(w.sum())
    if not (total > 0 and bool((w >= 0).all())):
        raise ValueError(f"merge weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / total


def weighted_average(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i W_i."""
    return torch.tensordot(w.to(t), t, dims=1)


# ---- TIES (Yadav et al., arXiv 2306.01708) -------------------------------------------------------------

def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Each member's task vector with all but its ceil(density * n) largest-magnitude entries set to 0."""
    flat = tau.reshape(len(tau), -1)
    keep = min(flat.shape[1], math.ceil(density * flat.shape[1]))
    idx = flat.abs().topk(keep, dim=1).indices
    out = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))
    return out.reshape(tau.shape)


def ties(t: torch.Tensor, w: torch.Tensor, merge_density: float = 0.2) -> torch.Tensor:
    """Trim, elect, disjoint merge, relative to the centroid W_c = t[0] (lambda = 1).

    tau_i = W_i - W_c (the TIES paper's sign: fine-tuned minus base); each trimmed to its top-d entries by
    magnitude; gamma = sign(sum_i w_i tau_i) per entry; tau = sum_{i: sign tau_i = gamma} w_i tau_i / sum of
    those w_i (0 where no member agrees); W = W_c + tau.
    """
    base = t[0]
    tau = trim(t - base, merge_density)
    wv = w.to(t).view((-1,) + (1,) * (t.dim() - 1))
    gamma = torch.sign((wv * tau).sum(0))
    agree = (torch.sign(tau) == gamma) & (gamma != 0)
    mass = (wv * agree).sum(0)
    merged = (wv * tau * agree).sum(0) / torch.where(mass > 0, mass, torch.ones_like(mass))
    return base + merged


# ---- spherical means: multislerp, Karcher -------------------------------------------------------------

def log_map(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log_m(u) rows: the tangent vectors at the unit m pointing to the units u, of length the angle."""
    cos = (u @ m).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    scale = torch.where(sin > 1e-15, theta / torch.where(sin > 1e-15, sin, torch.ones_like(sin)),
                        torch.ones_like(sin))
    return scale[:, None] * (u - cos[:, None] * m)


def exp_map(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """exp_m(v) = cos|v| m + sin|v| v / |v|: the unit reached from m along the tangent v."""
    n = float(v.norm())
    return m if n == 0 else math.cos(n) * m + math.sin(n) * (v / n)


def _sphere(t: torch.Tensor, w: torch.Tensor):
    """(units of the non-zero members [k', n], their weights renormalised, |W| = sum_i w_i |W_i|, m_0) or None
    when every member is zero; m_0 = sum w_i u_i / |.| (ValueError when that sum vanishes)."""
    flat = t.reshape(len(t), -1)
    norms = flat.norm(dim=1)
    scale = float(w.to(t) @ norms)
    live = norms > 0
    if not bool(live.any()):
        return None
    units, wl = flat[live] / norms[live, None], w.to(t)[live]
    wl = wl / wl.sum()
    mean = wl @ units
    if float(mean.norm()) < ANTIPODAL:
        raise ValueError("the members' directions cancel (antipodal); a spherical mean is undefined")
    return units, wl, scale, mean / mean.norm()


def multislerp(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One geodesic step from the normalised weighted mean m of the unit members: |W| exp_m(sum w_i log_m u_i).

    Two members give slerp(u_1, u_2; w_2) exactly (both logs lie on the one geodesic); more give a
    one-step approximation of the Karcher mean."""
    sphere = _sphere(t, w)
    if sphere is None:
        return torch.zeros_like(t[0])
    units, wl, scale, m = sphere
    return (scale * exp_map(m, wl @ log_map(m, units))).reshape(t.shape[1:])


def karcher(t: torch.Tensor, w: torch.Tensor, merge_tol: float = 1e-10, merge_max_iter: int = 100) -> torch.Tensor:
    """|W| u*, u* the weighted Karcher (Frechet) mean on the unit sphere: iterate u <- exp_u(sum w_i log_u u_i)
    from the normalised weighted mean until the step is below merge_tol (RuntimeError after merge_max_iter)."""
    sphere = _sphere(t, w)
    if sphere is None:
        return torch.zeros_like(t[0])
    units, wl, scale, u = sphere
    for _ in range(int(merge_max_iter)):
        step = wl @ log_map(u, units)
        if float(step.norm()) < merge_tol:
            return (scale * u).reshape(t.shape[1:])
        u = exp_map(u, step)
        u = u / u.norm()
    raise RuntimeError(f"the Karcher mean did not converge to method.merge_tol={merge_tol} in "
                       f"method.merge_max_iter={merge_max_iter} iterations")


# ---- Sub-MoE (arXiv 2506.23266) ------------------------------------------------------------------------

def joint_rank(merge_rank, full: int) -> int:
    """The rank kept of a joint SVD of full rank `full`: merge_rank null -> full; an integer -> that many (at most
    full); a fraction in (0, 1] -> ceil(fraction * full)."""
    if merge_rank is None:
        return full
    if isinstance(merge_rank, float):
        return max(1, min(full, math.ceil(merge_rank * full)))
    return min(int(merge_rank), full)


def sub_moe(t: torch.Tensor, w: torch.Tensor, merge_rank: int | float | None = None) -> torch.Tensor:
    """Joint SVD of the members' matrices side by side, [W_1 | ... | W_k] = U S [V_1^T | ... | V_k^T] (each W_i
    [out, in], so U [out, out'] is the group's shared left basis and V_i^T [r, in] member i's own columns);
    truncated to rank r (`joint_rank`), merged as U_r diag(S_r) sum_i w_i V_i^T. A bias (1-D) is averaged."""
    if t.dim() != 3:
        return weighted_average(t, w)
    k, rows, cols = t.shape
    joint = t.permute(1, 0, 2).reshape(rows, k * cols)  # member i's columns at [i * cols, (i + 1) * cols)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    r = joint_rank(merge_rank, len(s))
    right = vh[:r].reshape(r, k, cols)  # V_i^T = right[:, i]
    return (u[:, :r] * s[:r]) @ torch.einsum("k,rkc->rc", w.to(t), right)


OPERATORS = dict(average=weighted_average, ties=ties, multislerp=multislerp, karcher=karcher, sub_moe=sub_moe)


def merge_tensor(t: torch.Tensor, weights, op: dict) -> torch.Tensor:
    """Merge one tensor of a group, t [k, ...] (member 0 the centroid), by op = {"op": name, **its settings}:
    computed in float64, returned in t's dtype with a leading 1 ([1, ...])."""
    name = op["op"]
    params = {key: op[key] for key in MERGE_PARAMS[name] if key in op}
    out = OPERATORS[name](t.double(), normalised(weights).to(t.device), **params)
    return out.to(t.dtype).unsqueeze(0)
