"""The merge benchmark's roofline: the matrix products each REAM stage must do, and this machine's peak on them.

A stage is a list of `Product`s (m x k times k x n, `count` times); its FLOPs are 2 m k n count. `PeakClock`
times one plain matmul of each distinct shape in the running process (best of a few, on the stage's device
and dtype) and sums them, so a stage's seconds divided into that time is the fraction of the machine's
matmul peak it reached. The floor of exact REAM is the all-expert gate/up pass (every expert on every
similarity token, docs/algorithms.md REAM 2) at that peak: no implementation of it can take less.

What each stage must do, per MoE layer (T tokens in batches of t, S tokens a sequence, N experts, top-k,
hidden H, width I, N' kept, T_a alignment tokens, q PCA dimensions):

    observation  the decoder layer's forward (attention, router, the routed experts: T k rows of H x 2I
                 and I x H) and the dense pass (T x H times H x 2I for each of the N experts)
    propagation  the compressed layer's forward (N' experts), when sequential
    grouping     cosines of the N mean outputs (N x H times H x N)
    PCA          torch.pca_lowrank on the [N I, 3H] neuron features: 7 products of N I x 3H x q (niter 2)
    alignment    each aligned expert's activations on T_a tokens (T_a x H times H x 2I) unless the observing pass
                 kept them (method.align_cache_mb), and per member
                 the activation cost (I x T_a+2 times T_a+2 x I) and the weight cost (I x q+2 times q+2 x I);
                 the Hungarian assignments (scipy, CPU) are no products and are timed apart
    merge        weighted sums, no products
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Product:
    """`count` matrix products of m x k times k x n."""

    m: int
    k: int
    n: int
    count: float = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def flops(products: list[Product]) -> float:
    return sum(p.flops for p in products)


class PeakClock:
    """Seconds of a plain matmul per shape (best of `reps`), each shape timed once per process."""

    def __init__(self, device: torch.device, dtype: torch.dtype, reps: int = 3):
        self.device, self.dtype, self.reps = torch.device(device), dtype, reps
        self.seen: dict[tuple[int, int, int], float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def shape_seconds(self, m: int, k: int, n: int) -> float:
        key = (max(1, m), max(1, k), max(1, n))
        if key not in self.seen:
            a = torch.randn(key[0], key[1], device=self.device).to(self.dtype)
            b = torch.randn(key[1], key[2], device=self.device).to(self.dtype)
            torch.mm(a, b)  # warm-up
            best = float("inf")
            for _ in range(self.reps):
                self._sync()
                start = time.perf_counter()
                torch.mm(a, b)
                self._sync()
                best = min(best, time.perf_counter() - start)
            self.seen[key] = best
        return self.seen[key]

    def seconds(self, products: list[Product]) -> float:
        return sum(p.count * self.shape_seconds(round(p.m), p.k, p.n) for p in products)


# ---- the products of each stage -------------------------------------------------------------------

def attention(tokens: int, seq_len: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> list[Product]:
    """q, k, v, o projections and the (causal, counted whole) scores and weighted values of every head."""
    q, kv = heads * head_dim, kv_heads * head_dim
    seqs = tokens // seq_len
    return [Product(tokens, hidden, q + 2 * kv), Product(tokens, q, hidden),
            Product(seq_len, head_dim, seq_len, seqs * heads), Product(seq_len, seq_len, head_dim, seqs * heads)]


def routed(tokens: int, top_k: int, experts: int, hidden: int, width: int) -> list[Product]:
    """The router and the routed experts, their T k rows spread evenly over the experts."""
    rows = tokens * top_k / experts
    return [Product(tokens, hidden, experts), Product(rows, hidden, 2 * width, experts),
            Product(rows, width, hidden, experts)]


def dense(tokens: int, experts: int, hidden: int, width: int) -> list[Product]:
    """The all-expert gate/up pass: every expert on every token."""
    return [Product(tokens, hidden, 2 * width, experts)]


def grouping(experts: int, hidden: int) -> list[Product]:
    return [Product(experts, hidden, experts)]


def pca(experts: int, width: int, hidden: int, q: int) -> list[Product]:
    """torch.pca_lowrank(niter=2): the range finder's 6 products with the features, and the projection."""
    return [Product(experts * width, 3 * hidden, q, 7)]


def alignment(align_tokens: int, hidden: int, width: int, q: int, aligned: int, members: int,
              activations: bool = True, weights: bool = True) -> list[Product]:
    """Recomputed activations of the aligned experts, and each member's activation and weight costs."""
    out = []
    if activations:
        out += [Product(align_tokens, hidden, 2 * width, aligned), Product(width, align_tokens + 2, width, members)]
    if weights:
        out.append(Product(width, q + 2, width, members))
    return out


def aligned_counts(groups: list[list[int]], kept: int = 0) -> tuple[int, int]:
    """(experts whose activations alignment computes, members it aligns) for one layer's groups, where the
    observing pass kept the activations of experts 0..kept-1 (observation.KeptActivations): those are not
    computed again."""
    merged = [g for g in groups if len(g) > 1]
    return sum(e >= kept for g in merged for e in g), sum(len(g) - 1 for g in merged)


# ---- the table --------------------------------------------------------------------------------------

def stage_row(label: str, seconds: float, products: list[Product] | None, clock: PeakClock) -> dict:
    """One stage's FLOPs, time, rate and fraction of peak (None where the stage does no products)."""
    row = {"stage": label, "seconds": seconds, "gflop": None, "peak_seconds": None}
    if products:
        row["gflop"] = flops(products) / 1e9
        row["peak_seconds"] = clock.seconds(products)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'stage':<34} {'GFLOP':>9} {'seconds':>9} {'GFLOP/s':>9} {'peak s':>9} {'of peak':>8}"]
    for r in rows:
        if r["gflop"] is None or r["seconds"] <= 0:  # no products, or not timed apart
            lines.append(f"{r['stage']:<34} {'-':>9} {r['seconds']:>9.3f} {'-':>9} {'-':>9} {'-':>8}")
            continue
        rate, frac = r["gflop"] / r["seconds"], r["peak_seconds"] / r["seconds"]
        lines.append(f"{r['stage']:<34} {r['gflop']:>9.2f} {r['seconds']:>9.3f} {rate:>9.1f} "
                     f"{r['peak_seconds']:>9.3f} {frac:>7.0%}")
    return lines


def floor_line(total: float, floor_seconds: float, floor_gflop: float) -> str:
    return (f"REAM as a whole: {total:.3g} s; its floor, the all-expert gate/up pass ({floor_gflop:.3g} GFLOP) "
            f"at this machine's matmul peak: {floor_seconds:.3g} s; ratio {total / floor_seconds:.2f}")


def bound_line(rows: list[dict], floor_seconds: float) -> str:
    """Every stage's products at peak together: the least time these stages can take, beside the floor."""
    bound = sum(r["peak_seconds"] or 0.0 for r in rows)
    return (f"every stage's products at peak: {bound:.3g} s, {bound / floor_seconds:.2f} times the floor (the "
            "least ratio an implementation of these stages can reach on this machine)")
