"""The quantization environment: llm-compressor in a virtual environment of its own, beside ream-exp's.

    python -m ream_exp.quant.env            # builds it once under $REAM_EXP_CACHE/quant-venv: `make quant-env`
    python -m ream_exp.quant.env --venv DIR

llm-compressor pins transformers to an older range than ream-exp installs, and its oneshot leaves state
in the process that changes how a later from_pretrained loads a MoE checkpoint, so the quantization runs
in this environment, in a process of its own (ream_exp/quant/oneshot.py); ream-exp loads its output with
its own transformers (docs/quantization.md). The build installs torch first from the wheel the main
environment uses (CPU unless told otherwise), so pip does not fetch another torch for llm-compressor.
A run finds the environment at REAM_EXP_QUANT_PYTHON, else at <cache_dir>/quant-venv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError

PACKAGES = ("llmcompressor==0.14.0.1",)  # brings transformers 5.15-5.17 and compressed-tensors 0.19
TORCH = os.environ.get("REAM_EXP_QUANT_TORCH") or "torch==2.13.0"  # make quant-env passes the Makefile's TORCH
TORCH_INDEX = os.environ.get("REAM_EXP_QUANT_TORCH_INDEX") or ""    # and TORCH_INDEX (e.g. the CPU wheel index)
ENV_VAR = "REAM_EXP_QUANT_PYTHON"
PROBE = ("import importlib.metadata as m, torch; "
         "print(m.version('llmcompressor'), m.version('transformers'), torch.cuda.is_available())")


def default_venv(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("REAM_EXP_CACHE", "outputs/.cache")) / "quant-venv"


def probe(python: Path) -> tuple[str, str, bool] | None:
    """(llm-compressor version, transformers version, whether its torch sees a CUDA device) of `python`'s
    environment; None where it has no llm-compressor."""
    try:
        out = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": ""})
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.split()
    return (parts[0], parts[1], parts[2] == "True") if out.returncode == 0 and len(parts) == 3 else None


def quant_python(cache_dir: str | os.PathLike | None, name: str, needs_cuda: bool = False) -> Path:
    """The python of the quantization environment, or a ConfigError saying how to build one (or, with
    `needs_cuda`, that its torch sees no CUDA device)."""
    given = os.environ.get(ENV_VAR)
    python = Path(given) if given else default_venv(cache_dir) / "bin" / "python"
    found = probe(python)
    if found is not None and needs_cuda and not found[2]:
        raise ConfigError(f"quant={name} runs llm-compressor's AWQ, which needs a CUDA device (0.14 pins "
                          f"memory), and the torch of {python} sees none: use quant=w4a16_gptq on a CPU")
    if found is None:
        where = f"{ENV_VAR}={given}" if given else f"{python.parent.parent}"
        raise ConfigError(f"quant={name} needs the quantization environment (llm-compressor), not found at "
                          f"{where}: build it with `make quant-env` or `python -m ream_exp.quant.env`, "
                          f"or set {ENV_VAR}")
    return python


def build_venv(venv: Path) -> Path:
    """The python of a quantization environment at `venv`, built there unless it already works."""
    python = venv / "bin" / "python"
    if python.exists() and probe(python) is not None:
        return python
    clean = {**os.environ, "PYTHONPATH": ""}  # pip sees this environment alone, not a checkout on the path
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean)
    pip = [str(python), "-m", "pip", "install", "-q"]
    # torch first: llm-compressor's own torch requirement is then met, and pip fetches no other build
    subprocess.run([*pip, *TORCH_INDEX.split(), TORCH], check=True, env=clean)
    subprocess.run([*pip, *PACKAGES], check=True, env=clean)
    if probe(python) is None:
        raise SystemExit(f"{venv}: llm-compressor does not import after the build")
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ream_exp.quant.env", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="where (default: $REAM_EXP_CACHE/quant-venv)")
    args = parser.parse_args(argv)
    python = build_venv(args.venv or default_venv())
    print(python, *probe(python))


if __name__ == "__main__":
    main()
