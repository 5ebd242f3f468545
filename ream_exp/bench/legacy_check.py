"""Load a checkpoint in another Python environment (e.g. transformers 4.57) and record what it computes.

Standalone on purpose: it imports only torch and transformers, so it runs in an environment that has
neither ream-exp nor its dependencies. `ream_exp.bench.legacy` runs it as a script:

    OTHER_ENV/bin/python ream_exp/bench/legacy_check.py CHECKPOINT INPUTS.pt RESULT.pt

INPUTS.pt holds input_ids and attention_mask; RESULT.pt gets the logits, the transformers version, the
loading report (missing / unexpected / mismatched weights) and the config values the check compares.
Any weight that did not load is an error: an older stack fills such weights at random without failing.
"""

from __future__ import annotations

import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

# Config attributes whose silent defaults would change what the model computes.
CHECKED_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok",
                      "rope_theta", "partial_rotary_factor", "n_group", "topk_group")


def load_report(checkpoint: str, inputs: dict) -> dict:
    config = AutoConfig.from_pretrained(checkpoint)
    model, info = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, output_loading_info=True)
    problems = {k: [str(x) for x in v] for k, v in info.items() if v and k != "error_msgs"}
    if problems:
        raise SystemExit(f"{checkpoint}: weights did not load under transformers {transformers.__version__}: "
                         f"{problems}")
    with torch.no_grad():
        logits = model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return {
        "transformers": transformers.__version__,
        "logits": logits,
        "config": {a: getattr(config, a) for a in CHECKED_ATTRIBUTES if hasattr(config, a)},
        "rope_scaling": getattr(config, "rope_scaling", None),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: legacy_check.py CHECKPOINT INPUTS.pt RESULT.pt")
    checkpoint, inputs_path, result_path = argv
    torch.save(load_report(checkpoint, torch.load(inputs_path, weights_only=True)), result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
