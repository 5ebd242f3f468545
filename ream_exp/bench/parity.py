"""The merge benchmark at the parity shape: ream_official on a whole random Qwen3-MoE, stage by stage.

The model (built here, saved once in the work directory): 8 decoder layers, all MoE, 64 experts, top-8, hidden
256, expert width 128, on 64 x 128 random calibration tokens, ratio 0.5, group size 4, batches of 8 sequences.
ream-exp's calibrate + compress (plan and apply) runs in a fresh process; its stage times are the plan's
timings, each set against its roofline (roofline.py). When the official code is installed (official.py) its
merge of the same saved model runs in a fresh process too, the two interleaved in pairs (the order alternating),
each on `--threads` threads; the medians are compared and so are the merged weights. `--variant` adds a third run
to each pair: ream-exp with those overrides (e.g. method.align_cache_mb=0, what computing the alignment activations
again costs), its time and merged weights set beside the default's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from . import official, roofline
from .worker import in_fresh_process, run_config

SHAPE = dict(layers=8, experts=64, top_k=8, hidden=256, width=128, seqs=64, seq_len=128, ratio=0.5,
             group_size=4, batch_size=8, std=0.2)
FORWARDED = ("threads", "device", "clock")
VARIANT_WEIGHTS = "variant.pt"


def describe(s: dict) -> str:
    return (f"parity shape: random Qwen3-MoE, {s['layers']} MoE layers, {s['experts']} experts, top-{s['top_k']}, "
            f"hidden {s['hidden']}, width {s['width']}; {s['seqs']} x {s['seq_len']} calibration tokens, ratio "
            f"{s['ratio']}, group size {s['group_size']}, batches of {s['batch_size']}")


def prepare(root: Path, s: dict = SHAPE) -> None:
    """The model (model/, config.json readable by transformers 4.57 too), its calibration tokens, and the shape
    (shape.json, which the workers read)."""
    from ..checkpoint import legacy_keys
    from ..moe.tiny import VOCAB, tiny_model

    (root / "shape.json").write_text(json.dumps(s))
    model = tiny_model("qwen3_moe", num_experts=s["experts"], top_k=s["top_k"], hidden=s["hidden"],
                       layers=s["layers"], width=s["width"], std=s["std"], mlp_only_layers=[])
    model.save_pretrained(root / "model")
    config_path = root / "model" / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, **legacy_keys(model.config, saved)}, indent=2))
    ids = torch.randint(3, VOCAB, (s["seqs"], s["seq_len"]), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    torch.save({"input_ids": ids, "attention_mask": mask}, root / "calib.pt")
    official.calibration_file(root, ids, mask)


def stage_products(s: dict, config, plan, tokens: int, kept: int = 0) -> dict[str, list[roofline.Product]]:
    """The products each stage must do on the whole model (roofline.py), from the config and the plan; `kept`:
    the experts per layer whose alignment activations the observing pass kept (`kept_by_observation`)."""
    n, k, h, i = s["experts"], s["top_k"], s["hidden"], s["width"]
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    settings = plan.info["settings"]
    t_align = min(int(settings["align_tokens"]), tokens)
    out = {name: [] for name in ("observation", "propagation", "grouping", "PCA", "alignment")}
    for lp in plan.layers:
        n_keep = len(lp.keep)
        layer = roofline.attention(s["batch_size"] * s["seq_len"], s["seq_len"], h, heads, kv, hd)
        batches = tokens // (s["batch_size"] * s["seq_len"])
        attn = [roofline.Product(p.m, p.k, p.n, p.count * batches) for p in layer]
        out["observation"] += attn + roofline.routed(tokens, k, n, h, i) + roofline.dense(tokens, n, h, i)
        if settings["sequential"]:
            out["propagation"] += attn + roofline.routed(tokens, k, n_keep, h, i)
        out["grouping"] += roofline.grouping(n, h)
        out["PCA"] += roofline.pca(n, i, h, int(settings["pca_dim"]))
        aligned, members = roofline.aligned_counts(lp.groups, kept)
        out["alignment"] += roofline.alignment(t_align, h, i, int(settings["pca_dim"]), aligned, members)
    return out


def kept_by_observation(method: dict, s: dict, tokens: int, dtype: torch.dtype, device) -> int:
    """The experts per layer whose alignment activations the observing pass keeps with these method settings
    (their gate and up products, within method.align_cache_mb, when every alignment token is a similarity token,
    as with the default sim_tokens=null): the alignment does not compute them again."""
    from ..methods.observation import kept_activation_bytes, kept_experts

    if method.get("sim_tokens") or method.get("align") not in ("both", "activations"):
        return 0
    rows = min(int(method["align_tokens"]), tokens)
    row_bytes = 2 * s["width"] * torch.empty((), dtype=dtype).element_size()
    return kept_experts(s["experts"], rows, row_bytes, kept_activation_bytes(method.get("align_cache_mb"), device))


@contextlib.contextmanager
def job_settings(threads: int, clock: str):
    """Within the block torch uses `threads` threads and, with clock="cpu", every stopwatch of the run (its stages,
    the peak clock) reads this process's CPU time; both are restored on exit (the job may run in-process)."""
    threads_before, perf_counter = torch.get_num_threads(), time.perf_counter
    torch.set_num_threads(threads)
    if clock == "cpu":
        time.perf_counter = time.process_time
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        time.perf_counter = perf_counter


def ours(root: Path, args) -> dict:
    """Worker job: ream_official's calibrate + compress of the saved model, timed, with its roofline."""
    with job_settings(args.threads, getattr(args, "clock", "wall")):
        return _ours(root, args)


def _ours(root: Path, args) -> dict:
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from ..methods import Context, get_method
    from ..moe import apply_plan, canonical_weights, moe_layers

    s = json.loads((root / "shape.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).to(args.device).eval()
    calib = torch.load(root / "calib.pt")
    cfg = run_config(["method=ream_official", f"method.group_size={s['group_size']}", f"ratio={s['ratio']}",
                      *getattr(args, "ours_set", [])])
    method = OmegaConf.to_container(cfg.method, resolve=True)
    ctx = Context(model, calib, s["ratio"], method, seed=0, batch_size=s["batch_size"], progress=False)
    start = time.perf_counter()
    plan = get_method("ream_official").plan(ctx)
    apply_plan(model, plan)
    total = time.perf_counter() - start
    t = plan.info["timings"]
    tokens = int(calib["attention_mask"].sum())
    products = stage_products(s, model.config, plan, tokens,
                              kept_by_observation(method, s, tokens, torch.float32, args.device))
    clock = roofline.PeakClock(args.device, torch.float32)
    stage_seconds = {"observation": t.get("observe", 0.0), "propagation": t.get("propagate", 0.0),
                     "grouping": t.get("group", 0.0), "PCA": t.get("pca", 0.0),
                     "alignment": t.get("align", 0.0) - t.get("pca", 0.0) - t.get("hungarian", 0.0)}
    rows = [roofline.stage_row(name, stage_seconds[name], products[name], clock) for name in stage_seconds]
    rows.append(roofline.stage_row("Hungarian (scipy, CPU)", t.get("hungarian", 0.0), None, clock))
    rows.append(roofline.stage_row("merge", t.get("merge", 0.0), None, clock))
    rows.append(roofline.stage_row("other (capture, bookkeeping)", total - sum(r["seconds"] for r in rows), None,
                                   clock))
    floor = [p for lp in plan.layers for p in roofline.dense(tokens, s["experts"], s["hidden"], s["width"])]
    merged = {}
    for layer in moe_layers(model):
        w = canonical_weights(layer.experts, slice(None))
        merged[layer.index] = {k: v.detach().float().cpu().clone() for k, v in
                               (("gate", w["gate"]), ("up", w["up"]), ("down", w["down"]),
                                ("router", layer.router.weight))}
    torch.save(merged, root / (VARIANT_WEIGHTS if getattr(args, "ours_set", []) else "ours.pt"))
    return {"seconds": total, "rows": rows, "floor_seconds": clock.seconds(floor),
            "floor_gflop": roofline.flops(floor) / 1e9}


def run(root: Path, args, flags: list[str], s: dict = SHAPE) -> list[str]:
    """Interleaved pairs of ours and the official code (when args.official), the table of the median run."""
    prepare(root, s)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    python = None
    if args.official:
        official.check_code(Path(args.official))
        python = official.official_python(args.official_python)
    ours_runs, theirs_runs, variant_runs = [], [], []
    for pair in range(args.pairs):
        jobs = ["ours", "official"] + (["variant"] if args.variant else [])
        jobs = jobs if pair % 2 == 0 else jobs[::-1]
        for job in jobs:
            if job == "ours":
                ours_runs.append(in_fresh_process("merge", "ours", root, flags))
            elif job == "variant":
                variant = [f"--ours-set={o}" for o in args.variant]
                variant_runs.append(in_fresh_process("merge", "ours", root, flags + variant))
            elif python:
                theirs_runs.append(official.run(
                    python, Path(args.official).resolve(), root, root / "model", root / "official.pt",
                    size=s["seqs"], seq_len=s["seq_len"], merge_size=int(s["experts"] * s["ratio"]),
                    group_size=s["group_size"], batch_size=s["batch_size"], threads=args.threads, clock=args.clock))
    return report(s, ours_runs, theirs_runs, root, args) + variant_report(ours_runs, variant_runs, root, args)


def variant_report(ours_runs: list[dict], variant_runs: list[dict], root: Path, args) -> list[str]:
    """The variant's median time beside the default's, and how far its merged weights are from the default's."""
    if not variant_runs:
        return []
    ours_s, theirs_s = [r["seconds"] for r in ours_runs], [r["seconds"] for r in variant_runs]
    diff = official.max_difference(torch.load(root / "ours.pt"), torch.load(root / VARIANT_WEIGHTS))
    return [f"ream-exp with {' '.join(args.variant)}: median {statistics.median(theirs_s):.2f} s "
            f"({', '.join(f'{x:.2f}' for x in theirs_s)}); the default is "
            f"{statistics.median(theirs_s) / statistics.median(ours_s):.2f}x faster",
            f"merged experts and routers, default vs variant: max |difference| {diff:.2e}"]


def median_run(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=lambda r: r["seconds"])
    return ranked[(len(ranked) - 1) // 2]


def report(s: dict, ours_runs: list[dict], theirs_runs: list[dict], root: Path, args) -> list[str]:
    mid = median_run(ours_runs)
    lines = [describe(s), f"ream-exp method=ream_official, {args.device}, {args.threads} thread(s), "
             f"{len(ours_runs)} run(s), {getattr(args, 'clock', 'wall')} clock; the median run's stages:"]
    lines += roofline.table(mid["rows"])
    lines.append(roofline.floor_line(mid["seconds"], mid["floor_seconds"], mid["floor_gflop"]))
    lines.append(roofline.bound_line(mid["rows"], mid["floor_seconds"]))
    ours_s = [r["seconds"] for r in ours_runs]
    lines.append(f"ream-exp calibrate + compress: median {statistics.median(ours_s):.2f} s "
                 f"({', '.join(f'{x:.2f}' for x in ours_s)})")
    if not theirs_runs:
        lines.append("official code: not run (install it and pass --official DIR; see --help)")
        return lines
    theirs_s = [r["seconds"] for r in theirs_runs]
    lines.append(f"official code merge: median {statistics.median(theirs_s):.2f} s "
                 f"({', '.join(f'{x:.2f}' for x in theirs_s)}); ream-exp is "
                 f"{statistics.median(theirs_s) / statistics.median(ours_s):.2f}x faster")
    stages = median_run(theirs_runs)["stages"]
    if "hungarian" in stages:
        stages["alignment+merge"] = stages["alignment+merge"] - stages["hungarian"]
    lines.append("official code's stages (median run): " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    diff = official.max_difference(torch.load(root / "ours.pt"), torch.load(root / "official.pt"))
    lines.append(f"merged experts and routers, ream-exp vs official: max |difference| {diff:.2e}")
    return lines
