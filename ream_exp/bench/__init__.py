"""Benchmarks: ratios measured side by side in one run, never asserted (docs/benchmarks.md).

    python -m ream_exp.bench NAME [args]     # NAME: one of BENCHMARKS below; `NAME --help` for its settings
    make bench BENCH=NAME                    # the same through the Makefile (observe by default)

Each benchmark is one module here with a `main(argv)`; worker.py holds what those that measure whole runs in
fresh processes share (the worker protocol, the flags forwarded to it, the run's config and calibration
files). merge.py's parts: roofline.py (FLOPs and matmul peak), parity.py (the whole-model runs), official.py
(the official REAM code, installed apart). legacy_check.py and official_run.py are not benchmarks: they run as
scripts in the transformers 4.57 environment, so they import only torch, transformers (and the official code).
"""

from __future__ import annotations

import argparse
import importlib

PROG = "python -m ream_exp.bench"

# NAME -> (module in this package, what it measures); the modules are imported only when chosen.
BENCHMARKS = {
    "observe": ("observe", "observation pass / plain forward, tiny Qwen3-MoE with 128 experts, top-8"),
    "merge": ("merge", "REAM's roofline per stage, ours vs the official code; parity model, Qwen3-30B-A3B layer"),
    "stream": ("stream", "peak memory of a streamed and an in-memory run of the same compression"),
    "scale": ("scale", "streamed runs of a random model with Qwen3-30B-A3B's layers, extrapolated to 48"),
    "search": ("search", "the mix search against the 5-mix grid on the toy: hypervolume after each run"),
    "legacy": ("legacy", "do ream-exp's checkpoints load in transformers 4.57 with the same logits?"),
}


def prog(name: str) -> str:
    """The command line that runs benchmark `name`, for its argparse usage line."""
    return f"{PROG} {name}"


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<9}{summary}" for name, (_, summary) in BENCHMARKS.items())
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"benchmarks:\n{listing}\n\n`{PROG} NAME --help` shows its settings.")
    parser.add_argument("name", choices=BENCHMARKS, metavar="NAME", help="the benchmark: " + ", ".join(BENCHMARKS))
    parser.parse_args(argv[:1])  # --help, no name, or an unknown one: the listing or an error, and exit
    module = importlib.import_module(f"{__name__}.{BENCHMARKS[argv[0]][0]}")
    module.main(argv[1:])
