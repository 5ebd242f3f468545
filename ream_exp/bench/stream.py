"""Peak memory of a streamed (model.stream=true) and an in-memory run of the same compression, side by side.

    python -m ream_exp.bench stream [--layers 6 --experts 16 --hidden 2048 --width 768 --method freq]

Builds a random Qwen3-MoE (Qwen3-30B-A3B's hidden size and expert width, fewer experts and layers; float32,
about 2 GB with the defaults), saves it, then runs `ream_exp.run.run` on it twice, each in a fresh
subprocess: once in memory, once streamed. Each subprocess reports its peak resident memory (VmHWM) minus
its resident memory once everything is imported (the interpreter, torch, transformers), so the numbers
are what the run itself needed. Prints both, their ratio, and whether the two checkpoints hold identical
tensors. Nothing is asserted: it is a measurement.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import prog
from .worker import add_worker_arguments, calibration_overrides, main_of, peak_rss, rss, run_config, write_calibration

MODES = ("memory", "streamed")


def build(root: Path, args) -> int:
    """The random model and its tokenizer in root/model, and calibration texts in root/*.jsonl; returns
    the bytes of its weights."""
    from ..moe.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("qwen3_moe", num_experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                       layers=args.layers, width=args.width, mlp_only_layers=[])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_calibration(root, args.n, 4 * args.seq_len)
    return size


def overrides(root: Path, args, streamed: bool) -> list[str]:
    name = "streamed" if streamed else "memory"
    return ["model=local", f"model.path={root / 'model'}", "model.dtype=float32", f"model.stream={str(streamed).lower()}",
            "calib=local", f"calib.n={args.n}", f"calib.seq_len={args.seq_len}",
            *calibration_overrides(root),
            "eval=none", "logger=none", "baseline=false", "progress=false", f"method={args.method}",
            f"ratio={args.ratio}", f"cache_dir={root / ('cache-' + name)}", "device=cpu"]


def measure(root: Path, args, mode: str) -> dict:
    """One run in this (fresh) process, in memory or streamed (`mode`): {"peak_mib", "seconds"}."""
    from ..run import run

    streamed = mode == "streamed"
    cfg = run_config(overrides(root, args, streamed))
    import datasets  # noqa: F401  -- the libraries both runs import, counted in the base, not the run
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM  # noqa: F401

    from .. import calib, methods, partial_checkpoint, stream_source  # noqa: F401
    from ..methods import layer_stream  # noqa: F401
    base = rss()
    start = time.perf_counter()
    run(cfg, root / mode)
    peak = peak_rss() - base
    return {"peak_mib": peak / 2**20, "seconds": time.perf_counter() - start}


def identical(a: Path, b: Path) -> bool:
    """Same tensor names, dtypes and bytes in both checkpoints (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False
    for k in wa:
        with safe_open(wa[k], "pt") as ha, safe_open(wb[k], "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def _args(argv=None):
    p = argparse.ArgumentParser(prog=prog("stream"), description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--method", default="freq")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--n", type=int, default=16, help="calibration sequences per domain mix (calib.n)")
    p.add_argument("--seq-len", type=int, default=128)
    add_worker_arguments(p, MODES)
    return p.parse_args(argv)


# What a worker needs of the parent's settings.
FORWARDED = ("layers", "experts", "top_k", "hidden", "width", "method", "ratio", "n", "seq_len")


def main(argv=None) -> None:
    args = _args(argv)
    main_of("stream", args, measure, build, MODES, FORWARDED, lambda *built: report(args, *built))


def report(args, root: Path, size: int, results: dict) -> str:
    """In-memory vs streamed: peak memory above the interpreter, time, and whether the weights are identical."""
    same = identical(root / "memory" / "checkpoint", root / "streamed" / "checkpoint")
    mem, st = results["memory"], results["streamed"]
    lines = [f"model: qwen3_moe, {args.layers} layers, {args.experts} experts (top-{args.top_k}), "
             f"hidden {args.hidden}, width {args.width}, float32, {size / 2**20:.0f} MiB of weights; "
             f"method={args.method} ratio={args.ratio}",
             f"{'':<10}{'peak RSS above interpreter':>28}{'time':>10}"]
    for name, r in (("in-memory", mem), ("streamed", st)):
        lines.append(f"{name:<10}{r['peak_mib']:>24.0f} MiB{r['seconds']:>9.1f}s")
    lines.append(f"streamed / in-memory peak: {st['peak_mib'] / mem['peak_mib']:.1%}; identical weights: {same}")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
