"""The official REAM code (SamsungSAILMontreal/ream, arXiv 2604.04356) as the merge benchmark runs it.

It is never vendored: install it next to the project and give its directory to the benchmark,

    git clone https://github.com/SamsungSAILMontreal/ream /work/ream-official
    python -m ream_exp.bench merge --official /work/ream-official

It pins transformers 4.57, so it runs in the transformers 4.57 environment of `bench legacy` (built once under
$REAM_EXP_CACHE/tf457-venv, or --official-python), with the few packages its merge imports added there
(OFFICIAL_PACKAGES). official_run.py runs its Merger on the benchmark's saved model in a fresh process; the
merged experts come back in canonical form, to be compared with ream-exp's. The official code runs on CUDA
when its environment's torch has it (that environment's is the CPU build: on a GPU, give --official-python
an environment with a CUDA torch and transformers 4.57).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RUN_SCRIPT = Path(__file__).resolve().parent / "official_run.py"
# What the official merge imports beyond torch and transformers (datasets: its calibration module's import);
# huggingface_hub stays below 1.0 for transformers 4.57.
OFFICIAL_PACKAGES = ("scipy", "psutil", "tqdm", "datasets", "huggingface_hub<1.0")
IMPORTS = "import scipy, psutil, tqdm, datasets, transformers"


def official_python(python: str | None) -> str:
    """The python that runs the official code: `python`, or the tf457 environment of `bench legacy` (built
    if missing) with OFFICIAL_PACKAGES installed once."""
    if python:
        return os.path.abspath(python)  # it runs from the work directory; no resolve(): a venv's python is a link
    from .legacy import build_venv, default_venv

    exe = os.path.abspath(build_venv(default_venv()))
    if subprocess.run([exe, "-c", IMPORTS], capture_output=True).returncode != 0:
        subprocess.run([exe, "-m", "pip", "install", "-q", *OFFICIAL_PACKAGES], check=True)
    return exe


def check_code(code: Path) -> None:
    if not (code / "ream" / "merger.py").is_file():
        sys.exit(f"--official {code}: no ream/merger.py there; install the official code with "
                 f"`git clone https://github.com/SamsungSAILMontreal/ream {code}`")


def calibration_file(root: Path, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The batch where the official Merger(dataset='bench', tokenizer_name='qwen3', seed 42) looks for it."""
    (root / "data").mkdir(exist_ok=True)
    n, s = ids.shape
    torch.save({"input_ids": ids, "attention_mask": mask}, root / "data" / f"bench_b{n}_seq{s}_qwen3_seed42.pt")


def run(python: str, code: Path, root: Path, model_dir: Path, out: Path, *, size: int, seq_len: int,
        merge_size: int, group_size: int, batch_size: int, threads: int, clock: str = "wall") -> dict:
    """The official merge of model_dir in a fresh process (working directory root): {seconds, stages}."""
    flags = {"--code": code, "--model": model_dir, "--out": out, "--size": size, "--seq-len": seq_len,
             "--merge-size": merge_size, "--group-size": group_size, "--batch-size": batch_size,
             "--threads": threads, "--clock": clock}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([python, str(RUN_SCRIPT), *[str(x) for kv in flags.items() for x in kv]], cwd=root,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the official code failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_difference(ours: dict, theirs: dict) -> float:
    """Largest |difference| over every merged tensor of both (inf when they do not have the same shapes)."""
    worst = 0.0
    if ours.keys() != theirs.keys():
        return float("inf")
    for layer, tensors in ours.items():
        for name, t in tensors.items():
            other = theirs[layer][name]
            if other.shape != t.shape:
                return float("inf")
            worst = max(worst, float((t - other).abs().max()))
    return worst
