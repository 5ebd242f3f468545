"""The embedded toy world: seeded generators, disjoint splits, the shipped checkpoint, lm-eval tasks.

    pytest tests/test_toy.py

Runs on CPU against the checkpoint shipped in ream_exp/toy/checkpoint (``python -m ream_exp.toy.train``
rebuilds it). The quality checks use small limits and thresholds far above chance.
"""

import json
import random
import re

import pytest
import torch

from ream_exp.toy import arith, codegen, data, general
from ream_exp.toy.quality import TASKS, TASKS_DIR
from ream_exp.toy.splits import SPLITS, hash_split
from ream_exp.toy.tasks import utils as task_utils
from tests.tolerances import assert_f32_close

CHECKPOINT = data.HERE / "checkpoint"
N_TRAIN_DOCS = 300  # per domain; ~60K tokens of training text to search for leaks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The toy model's matrices are tiny: on shared cores a second thread only waits (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_text():
    rng = random.Random("leak-check")
    return {d: "\n".join(data.document(d, "train", rng) for _ in range(N_TRAIN_DOCS)) for d in data.DOMAINS}


@pytest.fixture(scope="module")
def toy_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT).eval()
    return model, AutoTokenizer.from_pretrained(CHECKPOINT)


# --- data -------------------------------------------------------------------------------------


def test_generators_are_deterministic():
    for domain in data.DOMAINS:
        a = data.document(domain, "train", random.Random(7))
        b = data.document(domain, "train", random.Random(7))
        c = data.document(domain, "train", random.Random(8))
        assert a == b and a != c
    assert data.calib_rows("math", n=5) == data.calib_rows("math", n=5)
    assert data.eval_sets() == data.eval_sets()


def test_shipped_files_match_the_generators():
    """The JSONL in the package is what `python -m ream_exp.toy.data` writes today."""
    for domain in data.DOMAINS:
        with open(data.HERE / "data" / f"calib_{domain}.jsonl") as f:
            shipped = [json.loads(line) for line in f]
        assert shipped == data.calib_rows(domain)
        assert len(shipped) >= 200 and all(len(r["text"]) >= data.DOC_CHARS - 2 for r in shipped)
    for task, rows in data.eval_sets().items():
        with open(TASKS_DIR / f"{task}.jsonl") as f:
            assert [json.loads(line) for line in f] == rows
        assert 100 <= len(rows) <= 200, task


@pytest.mark.parametrize("kind", list(general.KINDS))
def test_fact_phrasings_split_three_ways(kind):
    texts = {s: {i["text"] for i in general.fact_items(kind, s)} for s in SPLITS}
    assert not texts["train"] & texts["calib"] and not texts["train"] & texts["eval"]
    assert not texts["calib"] & texts["eval"]
    # every fact is still trained (in four phrasings) and evaluated (in one)
    per_fact = {}
    for item in general.fact_items(kind, "train"):
        per_fact.setdefault((item["subject"], item["relation"]), []).append(item)
    subjects, relations = general.KINDS[kind]
    assert len(per_fact) == len(subjects) * len(relations)
    assert {len(v) for v in per_fact.values()} == {general.N_PHRASINGS - 2}


def test_eval_items_never_appear_in_training_text(train_text):
    evals = data.eval_sets()
    for task in ("toy_facts", "toy_stories"):
        for row in evals[task]:
            sentence = f"{row['prompt']} {row['choices'][row['label']]}"
            assert sentence not in train_text["general"], sentence
    # math: no eval equation (op, a, b) occurs anywhere in training, bare or in a word problem
    trained = {f"{a} {op} {b}" for a, op, b in re.findall(r"(\d+) ([-+*]) (\d+) =", train_text["math"])}
    assert len(trained) > 500
    for row in evals["toy_arith"]:
        assert hash_split(row["key"]) == "eval"
        assert row["answer"].split(" = ")[0].strip() not in trained, row["prompt"]
    for row in evals["toy_code"]:
        assert hash_split(row["key"]) == "eval"
        assert row["prompt"].split("\n")[0] not in train_text["code"]


def test_calibration_text_is_disjoint_from_eval():
    evals = data.eval_sets()
    calib = {d: "\n".join(r["text"] for r in data.calib_rows(d, n=64)) for d in data.DOMAINS}
    for row in evals["toy_facts"] + evals["toy_stories"]:
        assert f"{row['prompt']} {row['choices'][row['label']]}" not in calib["general"]
    for row in evals["toy_code"]:
        assert row["prompt"].split("\n")[0] not in calib["code"]
    eval_equations = {r["answer"].split(" = ")[0].strip() for r in evals["toy_arith"]}
    for a, op, b in re.findall(r"(\d+) ([-+*]) (\d+) =", calib["math"]):
        assert f"{a} {op} {b}" not in eval_equations


def test_problem_answers_are_correct():
    rng = random.Random(0)
    for _ in range(200):
        p = arith.random_problem(rng)
        lhs, rhs = p["answer"].split(" = ")
        assert eval(lhs) == int(rhs) == p["target"]  # the answer's own equation, computed by Python
    for key in random.Random(0).sample(codegen.all_keys(), 50):
        f = codegen.make_function(*key)
        assert task_utils.run_tests(f["prompt"], f["body"], f["tests"]) == 1.0


# --- scorers ----------------------------------------------------------------------------------


def test_code_scorer_passes_right_and_fails_wrong_or_endless():
    f = codegen.make_function("clip", 9, "x")
    assert task_utils.run_tests(f["prompt"], f["body"], f["tests"]) == 1.0
    assert task_utils.run_tests(f["prompt"], "    return x", f["tests"]) == 0.0
    assert task_utils.run_tests(f["prompt"], "    return min(x, 8)", f["tests"]) == 0.0
    assert task_utils.run_tests(f["prompt"], "    while True:\n        pass", f["tests"], timeout=1.0) == 0.0
    assert task_utils.run_tests(f["prompt"], "    return (", f["tests"]) == 0.0  # syntax error
    # top-level code after the body is cut off, so it cannot fake a pass
    assert task_utils.function_body("    return x\nimport sys\nsys.exit(0)") == "    return x"
    doc = {"prompt": f["prompt"], "tests": f["tests"]}
    assert task_utils.process_code(doc, [f["body"] + "\n"]) == {"pass@1": 1.0}



def _passes_in_process(prompt: str, body: str, tests: list[str]) -> float:
    """Reference scorer for our own (known, harmless) bodies: exec in this interpreter."""
    try:
        exec(prompt + body + "\n\n" + "\n".join(tests) + "\n", {})
    except Exception:
        return 0.0
    return 1.0


def test_contained_code_scorer_agrees_with_running_in_process():
    """pass@1 through ream_exp.sandbox is what plain execution gives, for right and wrong bodies."""
    rng = random.Random(1)
    seen = set()
    for family, n, arg in rng.sample(codegen.all_keys(), 12):
        f = codegen.make_function(family, n, arg)
        wrong = codegen.make_function(family, n + 1 if isinstance(n, int) else n + "x", arg)["body"]
        for body in (f["body"], wrong, "    return None"):
            expected = _passes_in_process(f["prompt"], body, f["tests"])
            assert task_utils.run_tests(f["prompt"], body, f["tests"]) == expected, (f["key"], body)
            seen.add(expected)
    assert seen == {0.0, 1.0}


def test_arith_scorer_reads_the_final_number():
    doc = {"target": 19}
    assert task_utils.process_arith(doc, [" 12 + 7 = 19"]) == {"exact_match": 1.0}
    assert task_utils.process_arith(doc, [" 19"]) == {"exact_match": 1.0}
    assert task_utils.process_arith(doc, [" 12 + 7 = 18"]) == {"exact_match": 0.0}
    assert task_utils.process_arith(doc, [" twelve"]) == {"exact_match": 0.0}
    assert task_utils.process_arith(doc, [" 1\n19"]) == {"exact_match": 0.0}  # first line only


# --- checkpoint and lm-eval -------------------------------------------------------------------


def test_checkpoint_loads_and_is_small(toy_model):
    model, tok = toy_model
    cfg = model.config
    assert cfg.model_type == "qwen3_moe" and cfg.num_experts == 32 and cfg.num_experts_per_tok == 4
    assert cfg.norm_topk_prob and cfg.router_aux_loss_coef > 0
    size = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert size < 20e6
    ids = tok("Q: What is 12 + 7?\nA:")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == "Q: What is 12 + 7?\nA:"
    assert max(ids) < cfg.vocab_size


def test_greedy_answers_an_unseen_equation(toy_model):
    model, tok = toy_model
    row = data.eval_sets()["toy_arith"][1]
    enc = tok(row["prompt"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith(row["answer"].split(" = ")[0]), text  # restates the equation


def test_tasks_load_from_another_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    loaded = TaskManager(include_path=str(TASKS_DIR)).load(list(TASKS))["tasks"]
    assert set(loaded) == set(TASKS)
    assert loaded["toy_facts"].OUTPUT_TYPE == loaded["toy_stories"].OUTPUT_TYPE == "multiple_choice"
    assert loaded["toy_arith"].OUTPUT_TYPE == loaded["toy_code"].OUTPUT_TYPE == "generate_until"
    assert getattr(loaded["toy_code"], "UNSAFE_CODE", False)
    assert not getattr(loaded["toy_arith"], "UNSAFE_CODE", False)
    assert len(loaded["toy_facts"].test_docs()) == 160


def test_mc_tasks_well_above_chance(toy_model, tmp_path, monkeypatch):
    from ream_exp.toy.quality import evaluate

    monkeypatch.chdir(tmp_path)
    model, tok = toy_model
    scores = evaluate(model, tok, tasks=("toy_facts", "toy_stories"), limit=40)
    assert min(scores.values()) >= 0.6, scores  # chance is 0.25


@pytest.mark.slow
def test_gen_tasks_well_above_zero(toy_model):
    from ream_exp.toy.quality import evaluate

    model, tok = toy_model
    scores = evaluate(model, tok, tasks=("toy_arith", "toy_code"), limit=25)
    assert scores["toy_arith"] >= 0.4 and scores["toy_code"] >= 0.4, scores


def test_code_task_needs_the_unsafe_opt_in(toy_model):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = toy_model
    with pytest.raises(ValueError, match="unsafe"):
        lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4),
                                tasks=["toy_code"], limit=1,
                                task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                         include_defaults=False))


def test_experts_specialise_by_domain(toy_model):
    from ream_exp.toy.heatmap import domain_texts, routing_frequencies

    model, tok = toy_model
    texts = {d: t[:24] for d, t in domain_texts().items()}
    freq = routing_frequencies(model, tok, texts)
    assert freq.shape == (model.config.num_hidden_layers, 3, model.config.num_experts)
    # exact counts / tokens, summed over the experts in float32: rounding only
    assert_f32_close(freq.sum(-1), torch.full(freq.shape[:2], 4.0), terms=model.config.num_experts)
    # total-variation distance between two domains' routing distributions, per layer
    p = freq / 4
    tv = max(0.5 * (p[:, i] - p[:, j]).abs().sum(-1).max().item() for i in range(3) for j in range(i))
    assert tv > 0.3
    assert (freq.sum(1) > 0).float().mean() > 0.9  # nearly every expert is used
