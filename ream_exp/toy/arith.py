"""The toy world's math domain: arithmetic and one-step word problems, answered as an equation.

Every answer is written ``A: a op b = c``: the model first restates the equation (copying numbers
and picking the operation from the wording), then computes. The eval scores only the final number.
Splits are by the underlying equation (op, a, b), so an equation seen in evaluation was never seen
in training, neither bare nor inside a word problem.

Used by ``ream_exp.toy.data``; nothing here runs on its own.
"""

from __future__ import annotations

import random

from ream_exp.toy.general import NAMES, TOWNS

THINGS = ["apple", "pear", "egg", "plum", "stone", "coin", "shell", "nut"]
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
WORDS = {
    "add": [
        "{n} has {a} {o}s. {n} gets {b} more. How many {o}s does {n} have now?",
        "{n} picks {a} {o}s in the morning and {b} in the evening. How many {o}s did {n} pick?",
    ],
    "sub": [
        "{n} has {a} {o}s and gives {b} to {m}. How many {o}s does {n} have left?",
        "A shop in {t} had {a} {o}s and sold {b}. How many {o}s are left?",
    ],
    "mul": [
        "There are {a} boxes with {b} {o}s in each box. How many {o}s are there?",
        "{n} buys {a} bags of {b} {o}s. How many {o}s does {n} buy?",
    ],
}


def operands(op: str, rng: random.Random) -> tuple[int, int]:
    """Two-digit addition and subtraction (no negatives), small multiplication tables."""
    if op == "add":
        return rng.randint(0, 99), rng.randint(0, 99)
    if op == "sub":
        a = rng.randint(0, 99)
        return a, rng.randint(0, a)
    return rng.randint(2, 12), rng.randint(2, 9)


def compute(op: str, a: int, b: int) -> int:
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def random_problem(rng: random.Random, word_prob: float = 0.5) -> dict:
    """A bare ("What is a + b?") or word problem with its equation answer."""
    op = rng.choice(list(SYMBOL))
    a, b = operands(op, rng)
    if rng.random() < word_prob:
        n, m = rng.sample(NAMES, 2)
        question = rng.choice(WORDS[op]).format(n=n, m=m, t=rng.choice(TOWNS), o=rng.choice(THINGS),
                                                a=a, b=b)
    else:
        question = f"What is {a} {SYMBOL[op]} {b}?"
    c = compute(op, a, b)
    return dict(key=f"{op}|{a}|{b}", prompt=f"Q: {question}\nA:",
                answer=f" {a} {SYMBOL[op]} {b} = {c}", target=c)


def problem_text(p: dict) -> str:
    return p["prompt"] + p["answer"]
