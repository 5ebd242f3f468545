"""Benchmark of REAM's per-layer stages on one MoE layer shaped like Qwen3-30B-A3B's.

    python -m ream_exp.bench merge                                   # 128 experts, H 2048, I 768, top-8
    python -m ream_exp.bench merge --experts 32 --hidden 512 --width 192 --tokens 1024   # quick CPU run
    python -m ream_exp.bench merge --device cuda --dtype bfloat16 --tokens 16384

Prints the time of observation, grouping, alignment and merging, each as a multiple of one plain forward
of the layer over the same tokens, and the peak extra memory of each stage (CPU: resident set size
sampled every 2 ms; GPU: torch.cuda.max_memory_allocated). Observation is timed with the dense
similarity statistics (every expert on every token) exact, on a token sample (`--sim-tokens`), and off;
`--naive` adds the plain per-expert loop that the batched dense pass replaces.
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import contextmanager

import psutil
import torch

from ..methods.capture import BatchState
from ..methods.observation import Needs, observing_layer, token_sample
from ..methods.states import StateStore
from ..methods.merging import align_groups, floor_zero_saliency, group_by_pseudo_pruning, merge_layer_plan, ream_distance
from ..moe import apply_layer_plan, expert_output, moe_layers, router_probs
from ..moe.tiny import tiny_model
from ..plan import experts_to_keep
from . import prog


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or the process RSS sampled in a thread."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - base
            return
        proc, stop, top = psutil.Process(), threading.Event(), [0]
        base = proc.memory_info().rss

        def sample():
            while not stop.is_set():
                top[0] = max(top[0], proc.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(top[0], proc.memory_info().rss) - base


def timed(fn, device, reps: int = 1):
    """(best seconds over reps, peak extra bytes, result)."""
    mem, best, out = PeakMemory(device), float("inf"), None
    for _ in range(reps):
        with mem():
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best, mem.peak, out


def build_layer(args):
    model = tiny_model("qwen3_moe", num_experts=args.experts, top_k=args.top_k, hidden=args.hidden, layers=1,
                       width=args.width, std=0.02)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    layer = moe_layers(model)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, getattr(torch, args.dtype))
    return layer, x


@torch.no_grad()
def observe(layer, x, needs: Needs, chunk: int):
    """Observation of the layer on tokens x (in chunks, as calibration batches), all tokens non-pad."""
    mask = torch.ones(1, x.shape[0], dtype=torch.long)
    sim = token_sample(mask, needs.sim_tokens, 0).reshape(-1).to(x.device)
    align = token_sample(mask, needs.align_tokens, 0).reshape(-1).to(x.device)
    with observing_layer(layer, needs) as (obs, current):
        for s in range(0, x.shape[0], chunk):
            part = slice(s, s + chunk)
            n = x[part].shape[0]
            current["batch"] = BatchState(StateStore(), "bench", x.device, [], False,
                                          torch.ones(n, dtype=torch.bool, device=x.device), sim[part], align[part])
            layer.block(x[part][None])
    return obs


@torch.no_grad()
def naive_dense(layer, x, chunk: int):
    """The plain way: every expert's full output on every token, weighted by sigma and summed."""
    total = torch.zeros(layer.num_experts, x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk]
        sigma = router_probs(layer, layer.router(xc)[0])
        for e in range(layer.num_experts):
            total[e] += (expert_output(layer.experts, e, xc).double() * sigma[:, e, None].double()).sum(0)
    return total / x.shape[0]


def run(args) -> list[tuple[str, float, int]]:
    device = torch.device(args.device)
    layer, x = build_layer(args)
    n_keep = experts_to_keep(args.experts, args.ratio)
    fwd, fwd_mem, _ = timed(lambda: [layer.block(x[s:s + args.chunk][None]) for s in range(0, len(x), args.chunk)],
                            device, reps=3)
    rows = [("plain forward of the layer", fwd, fwd_mem)]
    observed = {}
    for label, needs in (
        (f"observe, dense exact ({len(x)} tokens)", Needs(dense="gated", align=True, align_tokens=args.align_tokens)),
        (f"observe, dense on {args.sim_tokens} sampled tokens",
         Needs(dense="gated", align=True, sim_tokens=args.sim_tokens, align_tokens=args.align_tokens)),
        ("observe, routing only (no dense)", Needs(align=True, align_tokens=args.align_tokens)),
    ):
        seconds, peak, observed[label] = timed(lambda: observe(layer, x, needs, args.chunk), device, reps=2)
        rows.append((label, seconds, peak))
    if args.naive:
        seconds, peak, _ = timed(lambda: naive_dense(layer, x, args.chunk), device)
        rows.append(("dense means, naive per-expert loop", seconds, peak))
    obs = next(iter(observed.values()))
    score = floor_zero_saliency(obs.reap_score)

    def group():
        dist = ream_distance(obs.mean_outputs, obs.logit_gram)
        return group_by_pseudo_pruning(score, dist, n_keep, args.group_size)

    seconds, peak, groups = timed(group, device)
    rows.append((f"group (C={args.group_size}, N'={n_keep})", seconds, peak))
    seconds, peak, perms = timed(lambda: align_groups(layer, groups, obs.align_x, "both", 64, 0), device)
    rows.append((f"align (both, PCA 64, {obs.align_x.shape[0]} tokens)", seconds, peak))
    lp = merge_layer_plan(layer, groups, score, perms, score, {})
    seconds, peak, _ = timed(lambda: apply_layer_plan(layer, lp), device)
    rows.append(("merge + slice", seconds, peak))
    return rows


def report(args, rows) -> str:
    fwd = rows[0][1]
    head = (f"MoE layer: {args.experts} experts, hidden {args.hidden}, width {args.width}, top-{args.top_k}, "
            f"{args.tokens} tokens, {args.dtype} on {args.device} ({torch.get_num_threads()} threads)")
    lines = [head, f"{'stage':<46} {'seconds':>9} {'x forward':>10} {'peak extra MiB':>15}"]
    for label, seconds, peak in rows:
        lines.append(f"{label:<46} {seconds:>9.3f} {seconds / fwd:>10.1f} {peak / 2**20:>15.1f}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(prog=prog("merge"), description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--sim-tokens", type=int, default=512, help="similarity sample size for the 'after' row")
    p.add_argument("--align-tokens", type=int, default=32768)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per forward (a calibration batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--naive", action="store_true", help="also time the per-expert loop for the dense means")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    print(report(args, run(args)), flush=True)


if __name__ == "__main__":
    main()
