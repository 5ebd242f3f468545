"""Do ream-exp's checkpoints load in transformers 4.57? Compress a tiny model of every family and compare.

    python -m ream_exp.bench legacy                      # builds the 4.57 environment once, then checks
    python -m ream_exp.bench legacy --venv DIR --families qwen3_moe mixtral
    python -m ream_exp.bench legacy --venv DIR --build-only   # only builds (or finds) it: `make tf457`

The environment (`python -m venv` + pip install torch==2.13.0 transformers==4.57.*) is built once under
$REAM_EXP_CACHE/tf457-venv (outputs/.cache by default) and reused; REAM_EXP_TF457_PYTHON=DIR/bin/python
then lets tests/test_checkpoint.py run the same check (`make test` sets it when CI=true: docs/getting-started.md,
CI).
Per family: a tiny random model with a non-default rope_theta (the value transformers 4.57 used to drop)
is compressed by `ream-exp`'s own run (method=ream, ratio 0.5, merged and aligned), and its checkpoint is
loaded by both stacks: every weight must load in 4.57 and its logits must equal transformers 5's to
float32 rounding.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import prog
from .worker import run_config


TF457 = ("torch==2.13.0", "transformers==4.57.*")
LOAD_SCRIPT = Path(__file__).resolve().parent / "legacy_check.py"
ROPE_THETA = 54321.0  # not any family's default, so a dropped rope_theta shows in the logits


def default_venv() -> Path:
    return Path(os.environ.get("REAM_EXP_CACHE", "outputs/.cache")) / "tf457-venv"


def build_venv(venv: Path) -> Path:
    """The python of a transformers 4.57 environment at `venv`, built there unless it already works."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import transformers, sys; sys.exit(not transformers.__version__.startswith('4.57.'))"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TF457], check=True)
    subprocess.run(probe, check=True)
    return python


def compressed_checkpoint(family: str, workdir: Path) -> Path:
    """A tiny `family` model compressed by a real ream-exp run (method=ream, ratio 0.5); its checkpoint/."""
    from ..moe.tiny import tiny_model, tiny_tokenizer
    from ..run import run

    model = tiny_model(family, num_experts=8, top_k=2)
    model.config.rope_parameters["rope_theta"] = ROPE_THETA
    base = workdir / f"{family}-base"
    type(model)(model.config).save_pretrained(base)  # rebuilt so the rotary tables use this rope_theta
    tiny_tokenizer().save_pretrained(base)
    cfg = run_config([
        "model=local", f"model.path={base}", "method=ream", "ratio=0.5", "calib=toy", "calib.n=16",
        "calib.seq_len=32", "eval=none", "logger=none", "progress=false", f"cache_dir={workdir / 'cache'}"])
    run(cfg, workdir / f"{family}-run")
    return workdir / f"{family}-run" / "checkpoint"


def compare_stacks(checkpoint: Path, python: Path, workdir: Path) -> dict:
    """Load `checkpoint` with transformers 5 here and with `python`'s stack; their logits and configs."""
    import json

    from transformers import AutoModelForCausalLM

    from ..moe.tiny import tiny_batch

    ids, mask = tiny_batch()
    inputs, result = workdir / "inputs.pt", workdir / f"{checkpoint.parent.name}-legacy.pt"
    torch.save({"input_ids": ids, "attention_mask": mask}, inputs)
    subprocess.run([str(python), str(LOAD_SCRIPT), str(checkpoint), str(inputs), str(result)], check=True,
                   env={**os.environ, "PYTHONPATH": ""})
    legacy = torch.load(result, weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return {"legacy": legacy, "logits": logits, "saved": json.loads((checkpoint / "config.json").read_text())}


def check_family(family: str, python: Path, workdir: Path) -> dict:
    """Raises AssertionError where transformers 4.57 reads the checkpoint differently; returns the facts."""
    out = compare_stacks(compressed_checkpoint(family, workdir), python, workdir)
    legacy, saved = out["legacy"], out["saved"]
    n = saved["compression"]["experts_per_layer"]["after"]
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    counts = {k: v for k, v in legacy["config"].items() if k in names}
    assert counts and set(counts.values()) == {n}, f"{family}: transformers 4.57 reads expert counts {counts}, not {n}"
    assert legacy["config"]["rope_theta"] == saved["rope_parameters"]["rope_theta"] == ROPE_THETA, family
    # the same float32 model in two implementations (per-expert loop vs fused): float32 rounding apart
    torch.testing.assert_close(legacy["logits"], out["logits"])
    return {"family": family, "transformers": legacy["transformers"], "experts": n,
            "max_abs_diff": float((legacy["logits"] - out["logits"]).abs().max())}


def main(argv: list[str] | None = None) -> None:
    from ..moe.tiny import TINY_FAMILIES

    parser = argparse.ArgumentParser(prog=prog("legacy"), description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="the transformers 4.57 environment")
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=TINY_FAMILIES)
    parser.add_argument("--build-only", action="store_true", help="build (or find) the environment, print its python")
    args = parser.parse_args(argv)
    python = build_venv(args.venv or default_venv())
    if args.build_only:
        print(python)
        return
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            try:
                r = check_family(family, python, Path(tmp))
                print(f"{family:12s} ok: transformers {r['transformers']} reads {r['experts']} experts, "
                      f"logits within {r['max_abs_diff']:.1e} of transformers 5")
            except (AssertionError, subprocess.CalledProcessError) as exc:
                failed.append(family)
                print(f"{family:12s} FAILED: {exc}")
    if failed:
        raise SystemExit(f"checkpoints of {', '.join(failed)} do not load the same in transformers 4.57")


if __name__ == "__main__":
    main()
