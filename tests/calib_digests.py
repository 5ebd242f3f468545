"""Digests of the toy's calibration tokens for the named mixes, to prove a change left them alone.

    python -m tests.calib_digests > tests/data/calib_digests.json

tests/data/calib_digests.json was written by this module run on main's code at bb294da, before calibration
mixes became mappings; tests/test_calib_mix.py recomputes every entry with the current code and compares. Do not
rewrite the file unless the tokens are meant to change (then bump calib.cache.FORMAT_VERSION too).
Each entry: the sha256 of the tokenised tensors (calib.cache.tensor_checksum) and the sha256 of the cache
key material with local files' size/mtime left out and paths inside the package written relative to it
(they differ between checkouts).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ream_exp.config  # noqa: F401  (the ${pkg:...} resolver)
from ream_exp import PACKAGE_DIR

CONF = PACKAGE_DIR.parent / "conf"
TOY_TOKENIZER = PACKAGE_DIR / "toy" / "checkpoint"
NAMED = sorted(p.stem for p in (CONF / "calib").glob("mix_*.yaml"))
VARIANTS = {  # the toy's own settings (packed 128 x 128), and truncated/padded rows with a different n
    "toy": [],
    "rows": ["calib.pack=false", "calib.n=37", "calib.seq_len=48", "calib.min_fill=0.5"],
}


def toy_calib(mix_overrides: list[str], variant: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["calib=toy", *mix_overrides, *VARIANTS[variant]])
    return cfg.calib


def named_mix(name: str) -> list[float]:
    """The three ratios a named mix file sets (its sources are the hub's; the digests use the toy's)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"calib={name}"])
    return [float(x) for x in OmegaConf.to_container(cfg.calib, resolve=True)["mix"]]


def digests(calib_cfg, tokenizer) -> dict:
    from ream_exp.calib import build_calibration
    from ream_exp.calib.cache import calibration_key_material, tensor_checksum

    material = calibration_key_material(calib_cfg, tokenizer)
    for source in material["sources"].values():
        source["files"] = None
        source["source"]["path"] = _in_checkout(source["source"]["path"])
    material["tokenizer"]["name_or_path"] = _in_checkout(material["tokenizer"]["name_or_path"])
    body = json.dumps(material, sort_keys=True, default=str)
    return {"tokens": tensor_checksum(build_calibration(calib_cfg, tokenizer)),
            "key_material": hashlib.sha256(body.encode()).hexdigest()}


def _in_checkout(path: str) -> str:
    """A path inside the package as a path relative to it: the digests must not depend on the checkout's place."""
    try:
        return "<package>/" + Path(path).resolve().relative_to(PACKAGE_DIR.resolve()).as_posix()
    except ValueError:
        return path


def cases() -> dict[str, list[str]]:
    """{case name: the calib.mix override on top of calib=toy} for the toy's default and every named mix."""
    out = {"toy_default": []}
    for name in NAMED:
        out[name] = ["calib.mix=[" + ",".join(repr(x) for x in named_mix(name)) + "]"]
    return out


def main() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY_TOKENIZER)
    table = {f"{case}/{variant}": {"overrides": overrides + VARIANTS[variant],
                                   **digests(toy_calib(overrides, variant), tok)}
             for case, overrides in cases().items() for variant in VARIANTS}
    json.dump(table, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
