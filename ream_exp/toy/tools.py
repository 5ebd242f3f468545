"""The toy world's tool-use texts: a fourth calibration source, traces of calls to four tools.

A trace is a question, the calls that answer it with their results, and the answer:

    Q: Find the job of Aldo, and work out 23 + 45.
    call lookup(name="Aldo", field="job")
    result: "baker"
    call calc(a=23, op="+", b=45)
    result: 68
    A: baker, and 68.

Tools: `lookup` (a person's town, job, pet or colour, from general.world), `tale` (a tale's hero,
place, treasure or foe), `calc` (an equation of the calibration split, arith) and `run` (a function of
the calibration split, codegen, called on one of its test inputs). The model was trained on general,
math and code only; these texts are for calibration (conf/calib/toy.yaml, source `tool`). They use only
characters of the training text and no evaluated equation or function (tests/test_calib_tool.py). Their
words (call, result, lookup, ...) are new to the model: 45% of the shipped file's tokens never occur in
300 tokenised training documents per domain, so `tool` is a domain unlike the training data, as a new
calibration domain for a real model often is.

Used by ``ream_exp.toy.data``; nothing here runs on its own.
"""

from __future__ import annotations

import random

from ream_exp.toy import arith, codegen, general
from ream_exp.toy.splits import draw

_PEOPLE = general.world("people")
_TALES = general.world("tales")
# Families whose test inputs and results print without quotes (strings would print as 'ab').
_RUN_FAMILIES = [f for f, ((args, _), *_rest) in codegen.FAMILIES.items() if args[0] not in ("s", "")]


def _lookup(split: str, rng: random.Random) -> tuple[str, str, str]:
    name, field = rng.choice(list(_PEOPLE)), rng.choice(list(general.PEOPLE_RELATIONS))
    value = _PEOPLE[name][field]
    return f"find the {field} of {name}", f'lookup(name="{name}", field="{field}")', f'"{value}"'


def _tale(split: str, rng: random.Random) -> tuple[str, str, str]:
    title, field = rng.choice(list(_TALES)), rng.choice(list(general.TALE_RELATIONS))
    value = _TALES[title][field]
    return f"find the {field} of the tale of {title}", f'tale(title="{title}", field="{field}")', f'"{value}"'


def _calc(split: str, rng: random.Random) -> tuple[str, str, str]:
    problem = draw(lambda r: arith.random_problem(r, word_prob=0.0), lambda p: p["key"], split, rng)
    op, a, b = problem["key"].split("|")
    symbol = arith.SYMBOL[op]
    return f"work out {a} {symbol} {b}", f'calc(a={a}, op="{symbol}", b={b})', str(problem["target"])


def _random_run_function(rng: random.Random) -> dict:
    family = rng.choice(_RUN_FAMILIES)
    (args, _), ns, _, _ = codegen.FAMILIES[family]
    return codegen.make_function(family, rng.choice(list(ns)), rng.choice(args))


def _run(split: str, rng: random.Random) -> tuple[str, str, str]:
    function = draw(_random_run_function, lambda f: f["key"], split, rng)
    call, result = rng.choice(function["tests"]).removeprefix("assert ").split(" == ")
    name, arg = call.split("(", 1)
    return f"run {name} on {arg[:-1]}", f'run(fn="{name}", arg={arg[:-1]})', result


TOOLS = {"lookup": _lookup, "tale": _tale, "calc": _calc, "run": _run}


def trace(split: str, rng: random.Random, max_calls: int = 3) -> str:
    """One question answered by 1..max_calls tool calls, each with its result, then the answer."""
    calls = [TOOLS[rng.choice(list(TOOLS))](split, rng) for _ in range(rng.randint(1, max_calls))]
    question = ", and ".join(ask for ask, _, _ in calls)
    lines = [f"Q: {question[0].upper()}{question[1:]}."]
    for _, call, result in calls:
        lines += [f"call {call}", f"result: {result}"]
    lines.append("A: " + ", and ".join(result.strip('"') for _, _, result in calls) + ".")
    return "\n".join(lines)
