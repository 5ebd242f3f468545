"""The observation pass against a plain forward, measured side by side in one run (never asserted).

    python -m ream_exp.bench observe [--experts 128 --top-k 8 --tokens 4096 --repeats 3]

A tiny Qwen3-MoE with the paper's expert count and top-k; the time of the observation pass
(REAP/EAN/freq statistics) divided by the time of a plain forward over the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..moe.tiny import tiny_batch, tiny_model
from ..observe import observe
from . import prog


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_observe(args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("qwen3_moe", num_experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                       layers=args.layers, width=args.width).to(device)
    seq = 256
    ids, mask = tiny_batch(batch=args.tokens // seq, seq=seq, pad_last=16)
    batches = [{"input_ids": ids[i:i + 4].to(device), "attention_mask": mask[i:i + 4].to(device)}
               for i in range(0, len(ids), 4)]

    @torch.no_grad()
    def plain():
        for b in batches:
            model(**b, use_cache=False)

    plain()  # warm-up
    rows = {}
    for impl in args.impls:
        model.config._experts_implementation = impl
        t_plain = _best_of(plain, args.repeats)
        t_obs = _best_of(lambda: observe(model, batches, progress=False), args.repeats)
        rows[impl] = (t_plain, t_obs, t_obs / t_plain)
    print(f"observe vs plain forward: qwen3_moe tiny, {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, "
          f"width {args.width}, {args.layers} layers, {ids.numel()} tokens, device {device}")
    print(f"{'plain experts kernel':>22} {'plain s':>9} {'observe s':>10} {'ratio':>7}")
    for impl, (a, b, r) in rows.items():
        print(f"{impl:>22} {a:9.3f} {b:10.3f} {r:7.2f}x")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog=prog("observe"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=["grouped_mm", "eager"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bench_observe(args)


if __name__ == "__main__":
    main()
