"""REAM's roofline: each stage's FLOPs, time and fraction of the machine's matmul peak, against the official code.

    python -m ream_exp.bench merge                                   # both shapes below
    python -m ream_exp.bench merge --shape parity --pairs 5 --official /work/ream-official
    python -m ream_exp.bench merge --shape layer --tokens 2048
    python -m ream_exp.bench merge --device cuda --dtype bfloat16 --tokens 16384

Two shapes. `parity` (parity.py): ream_official's calibrate + compress of a whole random Qwen3-MoE (8 MoE layers,
64 experts, top-8, hidden 256, width 128, 64 x 128 tokens, ratio 0.5, group size 4) in fresh processes, and, with
--official DIR, the official REAM code's merge of the same model (official.py says how to install it; it is never
vendored), interleaved in --pairs pairs on --threads threads (1 by default, for both), with the merged weights
compared. `layer`: the stages on one MoE layer shaped like Qwen3-30B-A3B's (128 experts, hidden 2048, width
768, top-8; ratio 0.25, group size 16), observation timed with the dense similarity statistics exact, on a token
sample (`--sim-tokens`) and off, beside a plain forward of the layer, with each stage's peak extra memory (CPU:
resident set sampled every 2 ms; GPU: torch.cuda.max_memory_allocated) and the Hungarian assignment's cost per
solve, scaled to a whole Qwen3-30B-A3B run.

Each stage prints the FLOPs it must do, its seconds, and the fraction of this machine's matmul peak (a plain
matmul of the same shapes timed in the same process, roofline.py); REAM as a whole prints its ratio to its
floor, the all-expert gate/up pass at that peak.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from ..methods.capture import BatchState, kept_align_rows
from ..methods.observation import Needs, observing_layer, token_sample
from ..methods.merging import (align_groups, floor_zero_saliency, group_by_pseudo_pruning, merge_layer_plan,
                               ream_distance)
from ..methods.scratch import scratch_buffers
from ..methods.states import StateStore
from ..moe import apply_layer_plan, moe_layers
from ..moe.tiny import tiny_model
from ..plan import experts_to_keep
from ..timing import Timings
from . import parity, prog, roofline
from .worker import add_worker_arguments, forward, serve

# A whole Qwen3-30B-A3B run (48 MoE layers, width 768) aligns 32 members per layer at ratio 0.25 (128 -> 96).
QWEN3_30B_LAYERS, QWEN3_30B_MEMBERS, QWEN3_30B_WIDTH = 48, 32, 768


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
    states = [BatchState(StateStore(), "bench", x.device, [], False,
                         torch.ones(len(sim[s:s + chunk]), dtype=torch.bool, device=x.device), sim[s:s + chunk],
                         align[s:s + chunk]) for s in range(0, x.shape[0], chunk)]
    with observing_layer(layer, needs, kept_align_rows(states, needs)) as (obs, current):
        for n, s in enumerate(range(0, x.shape[0], chunk)):
            current["batch"] = states[n]
            layer.block(x[s:s + chunk][None])
    return obs


def layer_rows(args) -> tuple[list[dict], dict]:
    """The stages on one layer: roofline rows (with peak MiB) and what the summary lines need. They run in one
    scratch pool (methods/scratch.py), as a run's layers do: buffers are reused chunk after chunk and stage after
    stage, so the first chunk's observation pays their page faults and later ones do not."""
    with scratch_buffers():
        return _layer_rows(args)


def _layer_rows(args) -> tuple[list[dict], dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = roofline.PeakClock(device, dtype)
    layer, x = build_layer(args)
    t, n, k, h, i = args.tokens, args.experts, args.top_k, args.hidden, args.width
    n_keep = experts_to_keep(n, args.ratio)
    rows = []

    def add(label, seconds, peak, products):
        rows.append({**roofline.stage_row(label, seconds, products, clock), "mib": peak / 2**20})

    fwd, peak, _ = timed(lambda: [layer.block(x[s:s + args.chunk][None]) for s in range(0, t, args.chunk)],
                         device, reps=3)
    add("plain forward of the layer", fwd, peak, roofline.routed(t, k, n, h, i))
    # the exact observation last: it is the one aligned, and its kept products live in the pool's "kept.*" buffers
    variants = [(f"observe, dense on {args.sim_tokens} tokens", args.sim_tokens,
                 roofline.dense(min(args.sim_tokens, t), n, h, i)),
                ("observe, routing only", 0, []),
                ("observe, dense exact", None, roofline.dense(t, n, h, i))]
    for label, sim_tokens, dense in variants:
        needs = Needs(dense="gated" if sim_tokens != 0 else None, align=True, sim_tokens=sim_tokens or None,
                      align_tokens=args.align_tokens)
        seconds, peak, observed = timed(lambda: observe(layer, x, needs, args.chunk), device)
        add(label, seconds, peak, roofline.routed(t, k, n, h, i) + dense)
    score = floor_zero_saliency(observed.reap_score)

    def group():
        return group_by_pseudo_pruning(score, ream_distance(observed.mean_outputs, observed.logit_gram), n_keep,
                                       args.group_size)

    seconds, peak, groups = timed(group, device)
    add(f"group (C={args.group_size}, N'={n_keep})", seconds, peak, roofline.grouping(n, h))
    timings = Timings()
    kept = observed.align_hidden.count if observed.align_hidden is not None else 0  # not computed again
    seconds, peak, perms = timed(lambda: align_groups(layer, groups, observed.align_x, "both", 64, 0, timings,
                                                      observed.take_align_hidden), device)
    aligned, members = roofline.aligned_counts(groups, kept)
    t_align = observed.align_x.shape[0]
    add("PCA (q 64)", timings["pca"], peak, roofline.pca(n, i, h, 64))
    add(f"align ({members} members, {t_align} tokens)", seconds - timings["pca"] - timings["hungarian"], peak,
        roofline.alignment(t_align, h, i, 64, aligned, members))
    add("Hungarian (scipy, CPU)", timings["hungarian"], 0, None)
    lp = merge_layer_plan(layer, groups, score, perms, score, {})
    seconds, peak, _ = timed(lambda: apply_layer_plan(layer, lp), device)
    add("merge + slice", seconds, peak, None)
    floor = roofline.dense(t, n, h, i)
    summary = {"members": members, "kept": kept, "hungarian": timings["hungarian"], "floor_seconds": clock.seconds(floor),
               "floor_gflop": roofline.flops(floor) / 1e9,
               "total": sum(r["seconds"] for r in rows[3:])}
    return rows, summary


def layer_report(args, rows, summary) -> list[str]:
    head = (f"one Qwen3-30B-A3B-shaped MoE layer: {args.experts} experts, hidden {args.hidden}, width {args.width}, "
            f"top-{args.top_k}, {args.tokens} tokens, ratio {args.ratio}, {args.dtype} on {args.device} "
            f"({torch.get_num_threads()} threads)")
    lines = [head]
    for line, row in zip(roofline.table(rows), [None, *rows]):
        lines.append(f"{line} {'peak MiB':>9}" if row is None else f"{line} {row['mib']:>9.1f}")
    lines.append(roofline.floor_line(summary["total"], summary["floor_seconds"], summary["floor_gflop"])
                 + " (observe exact + group + PCA + align + Hungarian + merge)")
    lines.append(roofline.bound_line(rows[3:], summary["floor_seconds"]))  # the stages of `total`
    if summary["members"]:
        per_solve = summary["hungarian"] / summary["members"]
        line = f"Hungarian assignment: {per_solve * 1e3:.1f} ms per {args.width} x {args.width} solve"
        if args.width == QWEN3_30B_WIDTH:
            solves = QWEN3_30B_LAYERS * QWEN3_30B_MEMBERS
            line += f"; a Qwen3-30B-A3B run at ratio 0.25 ({solves} solves) spends {per_solve * solves:.0f} s in it"
        lines.append(line)
    return lines


def parse(argv=None):
    p = argparse.ArgumentParser(prog=prog("merge"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("parity", "layer", "both"), default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the parity runs, ours and official")
    p.add_argument("--pairs", type=int, default=3, help="parity: interleaved (ours, official) pairs")
    p.add_argument("--official", default=None,
                   help="parity: the official REAM code's directory (git clone https://github.com/"
                        "SamsungSAILMontreal/ream DIR); it runs in bench legacy's transformers 4.57 environment")
    p.add_argument("--official-python", default=None,
                   help="parity: the python to run the official code with (default: that environment, built once)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="parity: what the stopwatches read, the wall clock or each process's CPU time "
                        "(time.process_time: with --threads 1 on a machine shared with other work, the work a run "
                        "did, not its waiting)")
    p.add_argument("--variant", nargs="*", default=[],
                   help="parity: also run ream-exp with these overrides in each pair (e.g. method.align_cache_mb=0)")
    p.add_argument("--ours-set", action="append", default=[], help=argparse.SUPPRESS)
    add_worker_arguments(p, ("ours",))
    layer = p.add_argument_group("layer shape (Qwen3-30B-A3B's by default)")
    layer.add_argument("--experts", type=int, default=128)
    layer.add_argument("--hidden", type=int, default=2048)
    layer.add_argument("--width", type=int, default=768)
    layer.add_argument("--top-k", type=int, default=8)
    layer.add_argument("--tokens", type=int, default=2048)
    layer.add_argument("--sim-tokens", type=int, default=512, help="similarity sample of the sampled row")
    layer.add_argument("--align-tokens", type=int, default=32768)
    layer.add_argument("--ratio", type=float, default=0.25)
    layer.add_argument("--group-size", type=int, default=16)
    layer.add_argument("--chunk", type=int, default=1024, help="tokens per forward (a calibration batch)")
    layer.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        serve(lambda root, a, job: parity.ours(root, a), args)
        return
    if args.shape in ("parity", "both"):
        with tempfile.TemporaryDirectory() if args.dir is None else _kept(args.dir) as root:
            print("\n".join(parity.run(Path(root), args, forward(args, parity.FORWARDED))), flush=True)
    if args.shape in ("layer", "both"):
        rows, summary = layer_rows(args)
        print("\n".join(layer_report(args, rows, summary)), flush=True)


@contextmanager
def _kept(path: str):
    Path(path).mkdir(parents=True, exist_ok=True)
    yield path


if __name__ == "__main__":
    main()
