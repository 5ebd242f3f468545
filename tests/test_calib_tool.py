"""The toy's fourth calibration source: tool-use traces written in characters the toy model was trained
on, whose results are right, which hold no evaluated item, and whose shipped file is the generator's."""

import json
import random
import re

import pytest

from ream_exp.toy import arith, codegen, data, general, tools
from ream_exp.toy.splits import hash_split

N_TRAIN_DOCS = 300  # per domain, as many as tests/test_toy.py draws


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.HERE / "checkpoint")


@pytest.fixture(scope="module")
def train_text():
    rng = random.Random(0)
    return "\n".join(data.document(d, "train", rng) for _ in range(N_TRAIN_DOCS) for d in data.DOMAINS)


@pytest.fixture(scope="module")
def tool_text():
    return "\n\n".join(r["text"] for r in data.calib_rows("tool"))


def test_shipped_tool_file_is_the_generators():
    with open(data.HERE / "data" / "calib_tool.jsonl") as f:
        shipped = [json.loads(line) for line in f]
    assert len(shipped) == data.N_CALIB and shipped == data.calib_rows("tool")
    assert data.calib_rows("tool", n=5) == data.calib_rows("tool", n=5)
    assert all(len(r["text"]) >= data.DOC_CHARS - 2 for r in shipped)


def test_every_character_is_covered_and_was_in_the_training_text(tokenizer, train_text, tool_text):
    """The traces use only characters of the training text, each a token of the toy vocabulary on its
    own (no unknown token, no byte the model never read), and their tokens decode to the text exactly."""
    assert set(tool_text) <= set(train_text), sorted(set(tool_text) - set(train_text))
    vocab = tokenizer.get_vocab()
    for char in sorted(set(tool_text)):
        (token,) = tokenizer.convert_ids_to_tokens(tokenizer(char, add_special_tokens=False)["input_ids"])
        assert token in vocab, char
    rows = data.calib_rows("tool")
    unk = tokenizer.unk_token_id
    for r in rows:
        ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        assert (unk is None or unk not in ids) and tokenizer.decode(ids) == r["text"]


def test_the_tool_results_are_right(tool_text):
    people, tales = general.world("people"), general.world("tales")
    calls = re.findall(r"call (\w+)\((.*)\)\nresult: (.*)", tool_text)
    assert {name for name, _, _ in calls} == set(tools.TOOLS) and len(calls) > 500
    scope: dict = {}
    for name, args, result in calls:
        if name == "lookup":
            who, field = re.fullmatch(r'name="(\w+)", field="(\w+)"', args).groups()
            assert result == f'"{people[who][field]}"'
        elif name == "tale":
            title, field = re.fullmatch(r'title="([\w ]+)", field="(\w+)"', args).groups()
            assert result == f'"{tales[title][field]}"'
        elif name == "calc":
            a, symbol, b = re.fullmatch(r'a=(\d+), op="([-+*])", b=(\d+)', args).groups()
            op = {v: k for k, v in arith.SYMBOL.items()}[symbol]
            assert int(result) == arith.compute(op, int(a), int(b))
        else:
            fn, arg = re.fullmatch(r'fn="(\w+)", arg=(.*)', args).groups()
            family, n = fn.rsplit("_", 1)
            for variable in codegen.FAMILIES[family][0][0]:  # run the function's own template code
                f = codegen.make_function(family, int(n), variable)
                exec(f["prompt"] + f["body"], scope)
            assert repr(eval(f"{fn}({arg})", scope)) == result


def test_the_traces_hold_no_evaluated_item(tool_text):
    evals = data.eval_sets()
    eval_equations = {r["answer"].split(" = ")[0].strip() for r in evals["toy_arith"]}
    for a, symbol, b in re.findall(r'calc\(a=(\d+), op="([-+*])", b=(\d+)\)', tool_text):
        assert f"{a} {symbol} {b}" not in eval_equations
        op = {v: k for k, v in arith.SYMBOL.items()}[symbol]
        assert hash_split(f"{op}|{a}|{b}") == "calib"
    for row in evals["toy_code"]:  # a function is evaluated by its signature; the traces only call names
        assert row["prompt"].split("\n")[0] not in tool_text
    for row in evals["toy_facts"] + evals["toy_stories"]:
        assert f"{row['prompt']} {row['choices'][row['label']]}" not in tool_text
