"""ream-exp: compress Mixture-of-Experts LLMs by pruning or merging experts, and benchmark the result."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent

__version__ = "0.1.0"

from . import config as _config  # noqa: E402,F401  (registers the ${pkg:...} and ${group_size:...} resolvers)
from . import identity as _identity  # noqa: E402,F401  (registers ${identity_free_overrides:})
