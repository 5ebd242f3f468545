"""ream-exp: compress Mixture-of-Experts LLMs by pruning or merging experts, and benchmark the result."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    """conf/ or sweeps/: inside the package when installed from a wheel (setup.py copies them there), else
    beside it, in the checkout (an editable install, PYTHONPATH); docs/getting-started.md, Install."""
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _shipped("conf")  # Hydra's primary config directory (ream_exp/cli.py)
SWEEPS_DIR = _shipped("sweeps")  # the multirun definitions: ream-exp -m --config-dir SWEEPS_DIR --config-name NAME

__version__ = "0.1.0"

from . import config as _config  # noqa: E402,F401  (registers the ${pkg:...} and ${group_size:...} resolvers)
from . import identity as _identity  # noqa: E402,F401  (registers ${identity_free_overrides:})


def load_compressed(path, device="cpu", dtype=None):
    """A ream-exp checkpoint as a CausalLM, also one whose MoE layers keep different numbers of experts
    (budget=global), which stock transformers and vLLM do not load (ream_exp/compressed.py)."""
    from .compressed import load_compressed as load

    return load(path, device, dtype)
