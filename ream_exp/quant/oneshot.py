"""The quantization itself, run in the quantization environment (`make quant-env`), never imported by ream-exp.

    python oneshot.py SPEC.json

SPEC.json (written by ream_exp.quant.stage) names the checkpoint to read, the calibration tokens (a .pt of
input_ids and attention_mask; null for round to nearest), the scheme, the algorithm, the group size, the
ignored modules and the directory to write. The model is quantized by llm-compressor's oneshot on those
tokens and saved in the compressed-tensors format; the quantized model's logits on the probe batch (`probe`,
a .pt of input_ids and attention_mask) are saved to `probe_out`, so the caller can check what a reload gives.
It runs in a process of its own: oneshot leaves state behind in the process (docs/quantization.md).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def calibration_rows(path: str):
    """The calibration tokens as a datasets.Dataset of unpadded rows (oneshot's own collator pads them)."""
    from datasets import Dataset

    tokens = torch.load(path, weights_only=True)
    ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
    rows = [row[m].tolist() for row, m in zip(ids, mask)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def scheme_groups(spec: dict) -> dict:
    """compressed-tensors config groups: the preset scheme on every Linear, with the spec's group size."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(spec["scheme"], ["Linear"])
    if spec.get("group_size"):
        scheme.weights.group_size = int(spec["group_size"])
    return {"group_0": scheme}


def recipe(spec: dict) -> list:
    """The oneshot recipe of the spec's algorithm: round to nearest (rtn), GPTQ or AWQ then rounding."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    quant = {"config_groups": scheme_groups(spec), "ignore": spec["ignore"]}
    if spec["algorithm"] == "rtn":
        return [QuantizationModifier(**quant)]
    if spec["algorithm"] == "gptq":
        return [GPTQModifier(**quant)]
    if spec["algorithm"] == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(**quant)]
    raise SystemExit(f"unknown algorithm {spec['algorithm']!r}")


def probe_logits(model, probe: str) -> torch.Tensor:
    batch = torch.load(probe, weights_only=True)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def main(spec_path: str) -> None:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    spec = json.loads(Path(spec_path).read_text())
    source, out = Path(spec["checkpoint"]), Path(spec["out"])
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    dataset = calibration_rows(spec["calib"]) if spec.get("calib") else None
    oneshot(model=model, dataset=dataset, recipe=recipe(spec), num_calibration_samples=len(dataset or []) or 1,
            max_seq_length=spec.get("seq_len") or 2048, shuffle_calibration_samples=False)
    model.save_pretrained(out, save_compressed=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    torch.save(probe_logits(model, spec["probe"]), spec["probe_out"])


if __name__ == "__main__":
    main(sys.argv[1])
