"""ream-exp: compress Mixture-of-Experts LLMs by pruning or merging experts, and benchmark the result."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

__version__ = "0.1.0"
