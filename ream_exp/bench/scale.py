"""Scale rehearsal: streamed compression of a random model with Qwen3-30B-A3B's layer shapes.

    python -m ream_exp.bench scale                          # GPU: bf16, 4 layers, 512 x 512 calibration tokens
    python -m ream_exp.bench scale --device cpu             # CPU: float32, 2 layers, 8 x 256 calibration tokens
    python -m ream_exp.bench scale --device cpu --experts 32 --methods freq,ream_official   # departs from the shape

The model is a random Qwen3-MoE with Qwen3-30B-A3B's exact decoder layer (hidden 2048, 128 experts, top-8,
expert width 768, 32 query / 4 key-value heads of 128, vocabulary 151936; every layer MoE) and only a few
layers, written as a safetensors checkpoint (bf16). Each method (freq, reap, ream_official by default) then
runs `ream_exp.run.run` with model.stream=true in a fresh subprocess: one decoder layer in memory at a
time, in bf16 on a GPU and float32 on CPU, on a random-text calibration set of the paper's shape (3072
sequences of 512 tokens, batch 8) scaled down by --n and --seq-len.

Per decoder layer it records the time from the end of the previous layer (or of the calibration capture) to
the layer's shard being written, and the peak memory while the layer was processed: on a GPU the torch
allocator's peak (torch.cuda.max_memory_allocated), on CPU the resident set sampled every 5 ms, both above
what the process held once everything was imported, also in layers (divided by one decoder layer's bytes in
the run's dtype). Printed: the per-layer numbers, the run extrapolated
to Qwen3-30B-A3B's 48 layers (the time outside the layers plus 48 times the mean layer time; the peak is
per layer, so it does not grow with the layer count), and beside them what the REAM paper reports for its
official code on one GPU: about 1.5 h sequential (1 h non-sequential) and about 30 GB beyond the 61 GB of
bf16 weights. The extrapolation is at the calibration size measured; the hidden states of the paper's
1.57M tokens add tokens x 2048 x bytes per element (6.4 GB in bf16) wherever calib.states_device keeps
them. Any shape flag that differs from Qwen3-30B-A3B is named in the output as a departure. Nothing is
asserted: it is a measurement.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from . import prog
from .worker import add_worker_arguments, calibration_overrides, main_of, peak_rss, rss, run_config, write_calibration

# Qwen3-30B-A3B's decoder layer (its config.json) and the paper's calibration and cost.
QWEN3_30B = dict(hidden=2048, experts=128, top_k=8, width=768, heads=32, kv_heads=4, head_dim=128, vocab=151936)
QWEN3_30B_LAYERS = 48
QWEN3_30B_WEIGHTS_GB = 61.0  # bf16
PAPER_CALIB = dict(n=3072, seq_len=512)
OFFICIAL = {"hours_sequential": 1.5, "hours_nonsequential": 1.0, "gb_beyond_weights": 30.0}
METHODS = ("freq", "reap", "ream_official")


def departures(args) -> dict[str, tuple[int, int]]:
    """Shape settings that differ from Qwen3-30B-A3B's: name -> (used, Qwen3-30B-A3B's)."""
    return {k: (getattr(args, k), v) for k, v in QWEN3_30B.items() if getattr(args, k) != v}


def build(root: Path, args) -> int:
    """The random checkpoint in root/model (bf16) and calibration texts in root/*.jsonl; returns the bytes
    of one decoder layer's weights in the run's dtype."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from ..moe.tiny import tiny_tokenizer

    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.width,
        intermediate_size=6144, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        max_position_embeddings=max(4096, args.seq_len), rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")  # a character tokenizer: ids < 112 of the vocabulary
    del model
    write_calibration(root, args.n, 2 * args.seq_len)
    return layer * (2 if args.dtype == "bfloat16" else 4)


def overrides(root: Path, args, method: str) -> list[str]:
    return ["model=local", f"model.path={root / 'model'}", f"model.dtype={args.dtype}", "model.stream=true",
            "calib=local", f"calib.n={args.n}", f"calib.seq_len={args.seq_len}", f"calib.batch_size={args.batch_size}",
            *calibration_overrides(root),
            "eval=none", "logger=none", "baseline=false", "progress=false", f"method={method}",
            f"ratio={args.ratio}", f"cache_dir={root / ('cache-' + method)}", f"device={args.device}"]


class LayerMeter:
    """Per decoder layer: seconds and peak memory (bytes above `base`) while the layer was processed.

    A layer's span ends when LayerStream.finished writes it and the next one starts there (the first at
    `start`, after the calibration capture)."""

    def __init__(self, device: str, base: int):
        self.cuda = device.startswith("cuda")
        self.base, self.layers, self.peak = base, [], 0
        self.t0 = None
        self._stop = threading.Event()
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def memory(self) -> int:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() - self.base
        return rss() - self.base

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss() - self.base)
            time.sleep(0.005)

    def _reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak = 0
        self.t0 = time.perf_counter()

    def start(self) -> None:
        if self.t0 is None:
            self._reset()

    def layer_done(self, index: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.layers.append({"layer": index, "seconds": time.perf_counter() - self.t0,
                            "peak_bytes": max(self.peak, self.memory())})
        self._reset()

    def close(self) -> None:
        self._stop.set()


def measure(root: Path, args, method: str) -> dict:
    """One streamed run of `method` in this process: {"seconds", "layers": [...], "peak_bytes"}."""
    import torch

    import datasets  # noqa: F401  -- what the run imports, imported before the base is taken
    import scipy.optimize  # noqa: F401
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM  # noqa: F401

    from .. import calib, methods, partial_checkpoint, stream_source  # noqa: F401
    from ..methods import layerwise, merging  # noqa: F401
    from ..methods.layer_stream import LayerStream
    from ..run import run

    cfg = run_config(overrides(root, args, method))
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
    base = torch.cuda.memory_allocated() if cuda else rss()
    meter = LayerMeter(args.device, base)
    load, finished = LayerStream.load, LayerStream.finished

    def metered_load(self, index):
        meter.start()  # the first decoder layer starts after the capture
        load(self, index)

    def metered_finished(self, index, plan=None):
        finished(self, index, plan)
        meter.layer_done(index)

    LayerStream.load, LayerStream.finished = metered_load, metered_finished
    start = time.perf_counter()
    try:
        run(cfg, root / method)
    finally:
        LayerStream.load, LayerStream.finished = load, finished
        meter.close()
    seconds = time.perf_counter() - start
    whole = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base  # over the whole run
    peak = max([whole] + [l["peak_bytes"] for l in meter.layers])
    return {"seconds": seconds, "layers": meter.layers, "peak_bytes": peak}


def extrapolate(result: dict, layers: int = QWEN3_30B_LAYERS) -> dict:
    """Time outside the decoder layers + `layers` x the mean layer time; the peak as measured."""
    per_layer = [l["seconds"] for l in result["layers"]]
    mean = sum(per_layer) / len(per_layer)
    outside = result["seconds"] - sum(per_layer)
    return {"mean_layer_seconds": mean, "seconds": outside + layers * mean, "peak_bytes": result["peak_bytes"]}


def report(args, layer_bytes: int, results: dict[str, dict], machine: str) -> str:
    gib = 2 ** 30
    tokens = args.n * args.seq_len
    lines = [f"random Qwen3-MoE, {args.layers} decoder layers of hidden {args.hidden}, {args.experts} experts "
             f"(top-{args.top_k}), width {args.width}, {args.heads}/{args.kv_heads} heads of {args.head_dim}, "
             f"vocabulary {args.vocab}; {args.dtype} on {machine}; one layer {layer_bytes / gib:.2f} GiB",
             f"calibration: {args.n} sequences x {args.seq_len} tokens (batch {args.batch_size}) = {tokens} tokens; "
             f"the paper: {PAPER_CALIB['n']} x {PAPER_CALIB['seq_len']}; ratio {args.ratio}"]
    off = departures(args)
    if off:
        lines.append("DEPARTS from Qwen3-30B-A3B's shape: "
                     + ", ".join(f"{k} {a} (not {b})" for k, (a, b) in off.items()))
    lines.append(f"{'method':<15}{'layer':>6}{'seconds':>10}{'peak GiB':>10}{'layers':>8}")
    for method, r in results.items():
        for l in r["layers"]:
            lines.append(f"{method:<15}{l['layer']:>6}{l['seconds']:>10.1f}{l['peak_bytes'] / gib:>10.2f}"
                         f"{l['peak_bytes'] / layer_bytes:>8.2f}")
    lines.append(f"extrapolated to {QWEN3_30B_LAYERS} layers at this calibration size (peak: streamed, whole run, "
                 "and in layers: the peak divided by one layer's bytes):")
    for method, r in results.items():
        e = extrapolate(r)
        lines.append(f"  {method:<15}{e['seconds'] / 3600:>7.2f} h ({e['mean_layer_seconds']:.1f} s per layer, "
                     f"{r['seconds']:.0f} s measured)   peak {e['peak_bytes'] / gib:.1f} GiB in all, "
                     f"{e['peak_bytes'] / layer_bytes:.2f} layers")
    states = PAPER_CALIB["n"] * PAPER_CALIB["seq_len"] * QWEN3_30B["hidden"] * 2 / gib
    lines.append(f"official REAM code (paper, one GPU, Qwen3-30B-A3B): ~{OFFICIAL['hours_sequential']} h "
                 f"sequential, ~{OFFICIAL['hours_nonsequential']} h non-sequential; "
                 f"~{OFFICIAL['gb_beyond_weights']:.0f} GB beyond the {QWEN3_30B_WEIGHTS_GB:.0f} GB of bf16 weights")
    lines.append(f"the paper's calibration adds {states:.1f} GiB of bf16 hidden states "
                 "(calib.states_device decides where)")
    return "\n".join(lines)


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    import os
    import platform

    model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")), platform.processor() or "CPU")
    return f"{model} ({os.cpu_count()} cores)"


def _args(argv=None):
    import torch

    p = argparse.ArgumentParser(prog=prog("scale"), description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on a GPU, 2 on CPU)")
    p.add_argument("--n", type=int, default=None, help="calibration sequences (default: 512 on a GPU, 8 on CPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512 on a GPU, 256 on CPU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.25, help="the paper's 128 -> 96")
    p.add_argument("--methods", default=",".join(METHODS))
    for k, v in QWEN3_30B.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v,
                       help=f"Qwen3-30B-A3B: {v}; any other value departs from its shape (reported)")
    add_worker_arguments(p)
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.layers = args.layers or (4 if gpu else 2)
    args.n = args.n or (512 if gpu else 8)
    args.seq_len = args.seq_len or (512 if gpu else 256)
    args.dtype = "bfloat16" if gpu else "float32"
    return args


# What a worker needs of the parent's settings (the rest it derives, as the parent did).
FORWARDED = ("device", "layers", "n", "seq_len", "batch_size", "ratio", *QWEN3_30B)


def main(argv=None) -> None:
    args = _args(argv)
    main_of("scale", args, measure, build, args.methods.split(","), FORWARDED,
            lambda root, layer_bytes, results: report(args, layer_bytes, results, machine_name(args.device)))

if __name__ == "__main__":
    main()
