"""Shared fixtures: offline settings, tiny real MoE checkpoints and calibration files built on the spot."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ream_exp.moe.tiny import tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TEXTS = {
    "general": ["The river town of Alder has a stone bridge and a market every Sunday morning."] * 3
    + [f"Story {i}: a fox named Fen walked to the hill and saw {i} birds over the lake." for i in range(40)],
    "math": [f"Question: what is {i} + {2 * i}? Answer: {3 * i}. Then {i} * 3 = {3 * i}, so both agree." for i in range(40)],
    "code": [f"def add_{i}(x):\n    y = x + {i}\n    return y * 2  # doubled sum for case {i}" for i in range(40)],
}


@pytest.fixture(autouse=True)
def _same_threads():
    """Each test starts with the suite's thread count: a test that runs a benchmark job in-process (it sets its
    own, e.g. bench.parity.ours) must not change the float sums of later tests, nor the count a test's child
    process gets (tests/stream_child.py sets the same count)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory):
    """One JSONL file per domain with a `text` field."""
    root = tmp_path_factory.mktemp("calib")
    paths = {}
    for domain, texts in TEXTS.items():
        paths[domain] = root / f"{domain}.jsonl"
        paths[domain].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny Qwen3-MoE (8 experts, top-2) with a character tokenizer, loadable by from_pretrained."""
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    tiny_model("qwen3_moe", num_experts=8, top_k=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
