"""How the toy world keeps train, calibration and evaluation apart.

Every generated item has a content key; a salt-free hash of the key puts it in exactly one split
(80% train, 10% calib, 10% eval). Generators draw random items and keep those of the split asked
for, so splits are disjoint by construction and never need to be enumerated.
Facts are the exception (see ``general.fact_split``): a fact must be trained to be known, so there
the held-out unit is the phrasing of a fact, not the fact.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

SPLITS = ("train", "calib", "eval")


def stable_hash(key: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per run)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def hash_split(key: str) -> str:
    bucket = stable_hash(key) % 100
    return "train" if bucket < 80 else "calib" if bucket < 90 else "eval"


def draw(make: Callable[[random.Random], dict], key: Callable[[dict], str], split: str,
         rng: random.Random) -> dict:
    """Draw items until one falls in `split` (1 in 10 tries for eval/calib, so cheap)."""
    while True:
        item = make(rng)
        if hash_split(key(item)) == split:
            return item
