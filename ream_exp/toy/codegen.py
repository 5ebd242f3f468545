"""The toy world's code domain: small Python functions whose name and docstring say what they do.

A function is a family (add_N, clip_N, count_above_N, ...) with a constant N and an argument name.
The model sees the signature and docstring and must write the body; pass@1 runs hidden asserts.
Solving an unseen function means copying N and the argument name into the pattern the family
uses, which a small model can learn. Splits are by (family, N, argument), see ``splits``.

Used by ``ream_exp.toy.data``; nothing here runs on its own.
"""

from __future__ import annotations

import random

from ream_exp.toy.general import NAMES

# (argument names, test inputs given N): inputs next to N tell a wrong constant from the right one.
SCALAR = (["x", "n", "num", "value", "k"], lambda n: [0, 7, n - 1, n, n + 1, 41])
LIST = (["xs", "items", "nums", "values"],
        lambda n: [[], [n - 1, n, n + 1], [3, 12, 7, 20, 1, n + 2], [30, 2, 18]])
STRING = (["s", "text", "word"], lambda n: ["ab", "xyz", ""])
NONE = ([""], lambda n: [None])

# family: (argument kind, range of N, docstring, body lines); {a} is the argument, {n} the constant.
FAMILIES = {
    "add": (SCALAR, range(1, 41), "Return {a} plus {n}.", ["return {a} + {n}"]),
    "minus": (SCALAR, range(1, 41), "Return {a} minus {n}.", ["return {a} - {n}"]),
    "times": (SCALAR, range(2, 31), "Return {a} times {n}.", ["return {a} * {n}"]),
    "is_multiple_of": (SCALAR, range(2, 13), "Return True if {a} is a multiple of {n}.",
                       ["return {a} % {n} == 0"]),
    "is_above": (SCALAR, range(1, 41), "Return True if {a} is above {n}.", ["return {a} > {n}"]),
    "clip": (SCALAR, range(1, 41), "Return {a}, but never more than {n}.",
             ["if {a} > {n}:", "    return {n}", "return {a}"]),
    "count_above": (LIST, range(0, 21), "Count the items of {a} that are above {n}.",
                    ["count = 0", "for item in {a}:", "    if item > {n}:", "        count += 1",
                     "return count"]),
    "sum_above": (LIST, range(0, 21), "Add up the items of {a} that are above {n}.",
                  ["total = 0", "for item in {a}:", "    if item > {n}:", "        total += item",
                   "return total"]),
    "scale": (LIST, range(2, 13), "Return every item of {a} times {n}.",
              ["return [item * {n} for item in {a}]"]),
    "first": (LIST, range(1, 6), "Return the first {n} items of {a}.", ["return {a}[:{n}]"]),
    "repeat": (STRING, range(2, 10), "Return {a} repeated {n} times.", ["return {a} * {n}"]),
    "greet": (NONE, NAMES, "Say hello to {n}.", ['return "Hello, {n}!"']),
}


def make_function(family: str, n, arg: str) -> dict:
    """One function: prompt (signature + docstring), canonical body, and asserts from running it."""
    (_, inputs), _, doc, body = FAMILIES[family]
    name = f"{family}_{str(n).lower()}"
    prompt = f'def {name}({arg}):\n    """{doc.format(a=arg, n=n)}"""\n'
    body_text = "\n".join("    " + line.format(a=arg, n=n) for line in body)
    calls = [f"{name}({x!r})" if x is not None else f"{name}()" for x in inputs(n)]
    scope: dict = {}
    exec(prompt + body_text, scope)  # our own template code, so the expected values are right
    tests = [f"assert {c} == {eval(c, scope)!r}" for c in calls]
    return dict(key=f"{family}|{n}|{arg}", prompt=prompt, body=body_text, tests=tests)


def all_keys() -> list[tuple[str, object, str]]:
    """The whole (finite) space of functions: family x N x argument name."""
    return [(f, n, a) for f, ((args, _), ns, _, _) in FAMILIES.items() for n in ns for a in args]


def random_function(rng: random.Random) -> dict:
    family = rng.choice(list(FAMILIES))
    (args, _), ns, _, _ = FAMILIES[family]
    return make_function(family, rng.choice(list(ns)), rng.choice(args))


def function_text(f: dict) -> str:
    return f["prompt"] + f["body"] + "\n"
