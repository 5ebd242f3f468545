"""Toy-world text for training, calibration and evaluation, in three domains (general, math, code),
plus tool-use traces (``tools.py``) that only calibration reads.

    python -m ream_exp.toy.data      # rewrites the shipped calibration and eval files

Writes ``ream_exp/toy/data/calib_{general,math,code,tool}.jsonl`` (field ``text``) and the eval sets
``ream_exp/toy/tasks/toy_{facts,stories,arith,code}.jsonl``. Training text is never written: the
trainer draws it from ``document(domain, "train", rng)`` on the fly. Everything is seeded, and the
three splits are disjoint (see ``splits`` and ``tests/test_toy.py``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ream_exp.toy import arith, codegen, general, tools
from ream_exp.toy.splits import draw, hash_split

HERE = Path(__file__).parent
DOMAINS = ("general", "math", "code")  # what the model was trained on
CALIB_SOURCES = (*DOMAINS, "tool")      # what the shipped calibration files hold
DOC_CHARS = 600  # about 150-400 tokens: longer than the calibration seq_len (128)
N_CALIB = 256
N_EVAL = {"toy_arith": 200}  # facts, tales and code: every item of the eval split


def _by_subject(kind: str, split: str) -> list[list[dict]]:
    by_subject: dict[str, list[dict]] = {}
    for item in general.fact_items(kind, split):
        by_subject.setdefault(item["subject"], []).append(item)
    return list(by_subject.values())


_FACTS = {(kind, split): _by_subject(kind, split) for kind in general.KINDS for split in ("train", "calib")}


def general_part(split: str, rng: random.Random) -> str:
    """A person's bio or a tale: four facts, each in a random phrasing of the split."""
    kind = rng.choice(list(general.KINDS))
    return general.paragraph(rng.choice(_FACTS[kind, split]), rng)


def math_part(split: str, rng: random.Random) -> str:
    return arith.problem_text(draw(arith.random_problem, lambda p: p["key"], split, rng))


def code_part(split: str, rng: random.Random) -> str:
    return codegen.function_text(draw(codegen.random_function, lambda f: f["key"], split, rng))


PARTS = {"general": (general_part, "\n\n"), "math": (math_part, "\n"), "code": (code_part, "\n"),
         "tool": (tools.trace, "\n\n")}


def document(domain: str, split: str, rng: random.Random, min_chars: int = DOC_CHARS) -> str:
    """Items of one domain and split, joined until they and their separators reach min_chars (so
    the text is at least min_chars - len(sep) long)."""
    make, sep = PARTS[domain]
    parts, length = [], 0
    while length < min_chars:
        parts.append(make(split, rng))
        length += len(parts[-1]) + len(sep)
    return sep.join(parts)


def calib_rows(domain: str, n: int = N_CALIB, seed: int = 1) -> list[dict]:
    rng = random.Random(f"calib-{domain}-{seed}")
    return [{"text": document(domain, "calib", rng)} for _ in range(n)]


def facts_eval(kind: str, rng: random.Random) -> list[dict]:
    """One MC item per fact: its held-out phrasing cut before the value, four choices."""
    rows = []
    for item in general.fact_items(kind, "eval"):
        choices, label = general.mc_choices(rng, item["answer"], item["values"])
        rows.append(dict(prompt=item["prompt"], choices=choices, label=label, key=item["key"]))
    return rows


def arith_eval(rng: random.Random, n: int) -> list[dict]:
    rows: dict[str, dict] = {}
    while len(rows) < n:
        p = draw(arith.random_problem, lambda p: p["key"], "eval", rng)
        rows.setdefault(p["prompt"], p)
    return list(rows.values())


def code_eval() -> list[dict]:
    """Every function of the eval split (the space is finite, about 130 of 1296)."""
    fs = [codegen.make_function(*k) for k in codegen.all_keys()]
    return [f for f in fs if hash_split(f["key"]) == "eval"]


def eval_sets(seed: int = 2) -> dict[str, list[dict]]:
    rng = random.Random(f"eval-{seed}")
    return {"toy_facts": facts_eval("people", rng), "toy_stories": facts_eval("tales", rng),
            "toy_arith": arith_eval(rng, N_EVAL["toy_arith"]), "toy_code": code_eval()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    for domain in CALIB_SOURCES:
        write_jsonl(HERE / "data" / f"calib_{domain}.jsonl", calib_rows(domain))
    for task, rows in eval_sets().items():
        write_jsonl(HERE / "tasks" / f"{task}.jsonl", rows)
        print(f"{task}: {len(rows)} items")


if __name__ == "__main__":
    main()
