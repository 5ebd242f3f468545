"""The quantization stage of a run: the saved checkpoint in, a compressed-tensors checkpoint out.

    from ream_exp.quant.stage import quantize_checkpoint
    facts = quantize_checkpoint(run_dir, settings, calib)     # settings: ream_exp.quant.check_quant's

The rule for the run directory: checkpoint/ always holds the model the run evaluates. With a quant stage
the model saved before it moves to checkpoint_unquantized/ (removed at the end, saying so in the log, only
with quant.keep_unquantized=false), llm-compressor writes the quantized model into checkpoint.quantizing/
in its own environment and process (oneshot.py), and that becomes checkpoint/ once complete. Its
config.json is the unquantized one (compression block, keys older transformers read) plus llm-compressor's
quantization_config, and the compression block gets a `quantization` entry; the model card says it too.
The quantized model's logits on a short probe (the first calibration row) come back with it, so the run
can record how far the reloaded model is from the one llm-compressor quantized (`reload_max_abs_diff`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ..atomic import atomic_write

log = logging.getLogger("ream_exp")

ONESHOT = Path(__file__).resolve().parent / "oneshot.py"
UNQUANTIZED = "checkpoint_unquantized"
PARTIAL = "checkpoint.quantizing"
PROBE_TOKENS = 32
LOG = "quant.log"


def probe_batch(calib: dict | None, vocab_size: int) -> dict:
    """The first calibration row's first PROBE_TOKENS tokens (a fixed pattern where the stage read none)."""
    if calib is None:
        ids = (torch.arange(PROBE_TOKENS) * 7919 % max(vocab_size - 1, 1) + 1).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: calib[k][:1, :PROBE_TOKENS].clone() for k in ("input_ids", "attention_mask")}


def calibration_file(calib: dict | None, n: int | None, path: Path) -> Path | None:
    if calib is None:
        return None
    rows = calib["input_ids"].shape[0] if n is None else min(int(n), calib["input_ids"].shape[0])
    torch.save({k: calib[k][:rows].clone() for k in ("input_ids", "attention_mask")}, path)
    return path


def run_oneshot(python: str, spec: dict, work: Path) -> None:
    """oneshot.py on `spec` in the quantization environment; its output goes to <run dir>/quant.log."""
    spec_path = work / "quant_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    with open(work / LOG, "w") as out:
        done = subprocess.run([python, str(ONESHOT), str(spec_path)], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": ""})
    spec_path.unlink()
    if done.returncode != 0:
        tail = (work / LOG).read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"quantization failed (exit {done.returncode}; {work / LOG}): {tail[0]}")


def quantization_block(settings: dict, quant_cfg: dict, calib_rows: int, versions: dict) -> dict:
    return {"name": settings["name"], "scheme": settings["scheme"], "algorithm": settings["algorithm"],
            "group_size": settings["group_size"], "ignore": settings["ignore"], "format": "compressed-tensors",
            "calibration_sequences": calib_rows, "settings": quant_cfg, "tools": versions,
            "unquantized": UNQUANTIZED if quant_cfg.get("keep_unquantized", True) else None}


def merged_config(unquantized: Path, quantized: Path, block: dict) -> bytes:
    """The unquantized config.json with llm-compressor's quantization_config and the quantization entry."""
    saved = json.loads((unquantized / "config.json").read_text())
    saved["quantization_config"] = json.loads((quantized / "config.json").read_text())["quantization_config"]
    saved.setdefault("compression", {})["quantization"] = block
    return (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode()


def quantize_checkpoint(run_dir: Path, settings: dict, quant_cfg: dict, calib: dict | None,
                        vocab_size: int) -> dict:
    """Quantizes <run_dir>/checkpoint as the rule above says; returns the quantization entry plus the
    probe batch and the quantized model's logits on it (`probe`, `probe_logits`)."""
    from .env import probe

    run_dir = Path(run_dir)
    checkpoint, before, partial = run_dir / "checkpoint", run_dir / UNQUANTIZED, run_dir / PARTIAL
    for leftover in (before, partial):
        if leftover.exists():
            shutil.rmtree(leftover)
    os.replace(checkpoint, before)
    reads = settings["algorithm"] != "rtn"  # round to nearest needs no calibration
    calib_path = calibration_file(calib if reads else None, quant_cfg.get("n"), run_dir / "quant_calib.pt")
    batch = probe_batch(calib, vocab_size)
    torch.save(batch, run_dir / "quant_probe.pt")
    spec = {"checkpoint": str(before), "out": str(partial), "calib": str(calib_path) if calib_path else None,
            "scheme": settings["scheme"], "algorithm": settings["algorithm"], "group_size": settings["group_size"],
            "ignore": settings["ignore"], "seq_len": int(calib["input_ids"].shape[1]) if calib_path else None,
            "probe": str(run_dir / "quant_probe.pt"), "probe_out": str(run_dir / "quant_probe_logits.pt")}
    try:
        run_oneshot(settings["python"], spec, run_dir)
        probe_logits = torch.load(run_dir / "quant_probe_logits.pt", weights_only=True)
    finally:
        for name in ("quant_calib.pt", "quant_probe.pt", "quant_probe_logits.pt"):
            (run_dir / name).unlink(missing_ok=True)
    llmc, transformers, _ = probe(Path(settings["python"])) or (None, None, None)
    rows = _rows(calib, quant_cfg.get("n")) if calib_path else 0
    block = quantization_block(settings, quant_cfg, rows, {"llmcompressor": llmc, "transformers": transformers})
    for name in ("plan.json", "plan_perms.pt"):  # provenance beside the weights, as in the unquantized one
        if (before / name).exists():
            shutil.copy2(before / name, partial / name)
    text = merged_config(before, partial, block)
    atomic_write(partial / "config.json", lambda f: f.write(text))
    os.replace(partial, checkpoint)
    from ..checkpoint import write_model_card

    write_model_card(checkpoint)
    if not quant_cfg.get("keep_unquantized", True):
        shutil.rmtree(before)
        log.info("quant.keep_unquantized=false: removed %s", before)
    return {**block, "probe": batch, "probe_logits": probe_logits}


def _rows(calib: dict | None, n) -> int:
    if calib is None:
        return 0
    total = int(calib["input_ids"].shape[0])
    return total if n is None else min(int(n), total)
