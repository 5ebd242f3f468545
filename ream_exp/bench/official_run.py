"""Runs the official REAM code's merge on a saved model: a script for the official code's own environment.

    PYTHON official_run.py --code DIR --model DIR --size N --seq-len S --merge-size K --group-size C --out FILE

Run by ream_exp/bench/official.py with the working directory holding data/bench_b{N}_seq{S}_qwen3_seed42.pt (the
calibration batch where the official Merger looks for it). It imports torch, transformers and the official
code only (not ream-exp, which needs transformers 5). It times Merger(...) and fit() (the model is loaded
before), and each stage by wrapping the official functions that do it (observation and propagation are its
forward passes with and without collecting outputs); it writes the merged experts and routers in ream-exp's
canonical form (gate/up [N', I, H], down [N', H, I], router [N', H]) to --out, and prints the seconds as JSON.

The official code's one random step, a token permutation drawn for each expert when it samples activation
tokens (so that its centroid and member rows pair different tokens), is made the identity, as
docs/algorithms.md (Paper, official code and presets) compares the two: with it ream_official's merge is the
official one to float32 rounding. It costs nothing measurable either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy
import torch


def stage_clock(seconds: dict):
    """wrap(fn, stage): fn, its wall time added to seconds[stage] (stage may be a function of the call)."""
    def wrap(fn, stage):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                name = stage(*args, **kwargs) if callable(stage) else stage
                seconds[name] += time.perf_counter() - start
        return timed
    return wrap


def instrument(merger_module, seconds: dict) -> None:
    wrap = stage_clock(seconds)
    cls = merger_module.Merger
    cls._forward_pass = wrap(cls._forward_pass, lambda *a, collect_outputs=True, **k:
                             "observation" if collect_outputs else "propagation")
    cls._merge = wrap(cls._merge, "alignment+merge")
    for name, stage in (("pseudo_group", "grouping"), ("hcsmoe", "grouping"), ("pca_reduce", "PCA"),
                        ("ffn_weight_matrix", "PCA"), ("experts_weight_matrix", "PCA"),
                        ("linear_sum_assignment", "hungarian")):
        setattr(merger_module, name, wrap(getattr(merger_module, name), stage))


def canonical(model) -> dict:
    out = {}
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is None:
            continue
        if isinstance(experts, torch.nn.ModuleList):
            gate = torch.stack([e.gate_proj.weight for e in experts])
            up = torch.stack([e.up_proj.weight for e in experts])
            down = torch.stack([e.down_proj.weight for e in experts])
        else:
            gate, up = experts.gate_up_proj.chunk(2, dim=1)
            down = experts.down_proj
        out[i] = {"gate": gate.float().clone(), "up": up.float().clone(), "down": down.float().clone(),
                  "router": mlp.gate.weight.float().clone()}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--code", "--model", "--out"):
        p.add_argument(flag, required=True)
    for flag in ("--size", "--seq-len", "--merge-size", "--group-size", "--batch-size", "--threads"):
        p.add_argument(flag, type=int, required=True)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    if args.clock == "cpu":  # every stopwatch reads this process's CPU time (bench merge --clock)
        time.perf_counter = time.process_time
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.code)
    from transformers import AutoModelForCausalLM

    import ream.merger as merger_module

    numpy.random.permutation = numpy.arange  # its only use in the merge: the per-expert token sample
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    seconds: dict = defaultdict(float)
    instrument(merger_module, seconds)
    start = time.perf_counter()
    merger = merger_module.Merger(model, merge_size=args.merge_size, dataset="bench", mix_ratio="1.0",
                                  tokenizer_name="qwen3", batch_size=args.batch_size, group_size=args.group_size,
                                  calibration_data_size=args.size, calibration_data_seq_len=args.seq_len,
                                  verbose=False)
    merged = merger.fit()
    total = time.perf_counter() - start
    torch.save(canonical(merged), args.out)
    print(json.dumps({"seconds": total, "stages": dict(seconds)}))


if __name__ == "__main__":
    main()
