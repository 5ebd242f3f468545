"""The GEN suite as the paper ran it (docs/algorithms.md, "GEN protocol"), replayed item by item.

    pytest tests/test_gen_protocol.py

Offline: each of conf/eval/gen.yaml's six tasks is run by ream_exp.evaluation exactly as `eval=gen` runs
it -- the task YAML lm-eval's index resolves, gen.yaml's shots, metrics and chat template -- on a
handful of items written here (a local copy of the task that differs only in where its documents come
from), with a scripted model giving replies typical of an instruct model. The scripted model honours
the request's stop sequences, as a real backend does; everything else (prompt building, few-shot turns,
filters, metrics, the sandbox) is lm-eval's and ream-exp's own code.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from ream_exp.evaluation import checks, data_needs, harness, task_index  # noqa: E402
from ream_exp.config import ConfigError  # noqa: E402
from tests.scripted_lm import scripted_lm  # noqa: E402

CONF_EVAL = Path(__file__).resolve().parents[1] / "conf" / "eval"
LCB_DATA = Path(__file__).resolve().parent / "data" / "livecodebench"
GEN = yaml.safe_load((CONF_EVAL / "gen.yaml").read_text())
SUFFIX = "_replay"

# ---------------------------------------------------------------- the items
HUMANEVAL = [
    {"task_id": "r/0", "entry_point": "add", "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b. [he-add]"""\n',
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "canonical_solution": ""},
    {"task_id": "r/1", "entry_point": "evens",
     "prompt": 'from typing import List\n\n\ndef evens(xs: List[int]) -> List[int]:\n    """The even numbers of xs. [he-evens]"""\n',
     "test": "def check(candidate):\n    assert candidate([1, 2, 3, 4]) == [2, 4]\n", "canonical_solution": ""},
    {"task_id": "r/2", "entry_point": "neg", "prompt": 'def neg(x: int) -> int:\n    """Minus x. [he-neg]"""\n',
     "test": "def check(candidate):\n    assert candidate(3) == -3\n", "canonical_solution": ""},
]
HUMANEVAL_REPLIES = {  # the assistant turn continues humaneval_instruct's prefix, which opened ```python
    "he-add": "    return a + b\n```\n\nThis function returns the sum of `a` and `b`.",            # right
    "he-evens": "    result = []\n    for x in xs:\n        if x % 2 == 0:\n            result.append(x)\n"
                "    return result\n```\n\n### Explanation\nWe keep the even numbers.",          # right
    "he-neg": "    return x\n```\nDone.",                                                          # wrong
}

GPQA_QUESTIONS = [(f"Which value is number {i}? [gpqa-{i}]", f"right {i}", [f"wrong {i}{c}" for c in "xyz"])
                  for i in range(8)]
GPQA = [{"Question": q, "Correct Answer": right, "Incorrect Answer 1": w[0], "Incorrect Answer 2": w[1],
         "Incorrect Answer 3": w[2]} for q, right, w in GPQA_QUESTIONS]
# reply style per item: bare "(X)" as the 5 shots answer, "The answer is (X)", or a wrong letter
GPQA_STYLE = {0: "bare", 1: "the answer is", 2: "bare", 3: "wrong", 4: "the answer is", 5: "bare",
              6: "the answer is.", 7: "wrong"}

GSM8K_TRAIN = [{"question": f"Shot {i}: what is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
               for i in range(1, 9)]
GSM8K_TEST = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                 "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                 "daily for $2 per fresh duck egg. How much in dollars does she make every day? [gsm-ducks]",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total? [gsm-robe]",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3"},
    {"question": "Josh buys a house for $80,000 and puts in $50,000 in repairs, which increases its value by "
                 "150%. How much profit did he make? [gsm-house]",
     "answer": "The cost was 80,000+50,000=$<<80000+50000=130000>>130,000\n...\n#### 70000"},
]
GSM8K_REPLIES = {  # long chains of thought, the answer at the end in three styles; the last one is wrong
    "gsm-ducks": ("Let's think step by step.\n1. Janet's ducks lay 16 eggs per day.\n2. She eats 3 for breakfast, "
                  "so 16 - 3 = 13 eggs remain.\n3. She uses 4 for muffins, so 13 - 4 = 9 eggs remain.\n"
                  "4. She sells each of the 9 eggs for $2, so 9 × 2 = 18.\n\nTherefore she makes **$18** every day."),
    "gsm-robe": ("The robe needs 2 bolts of blue fiber. White fiber is half of that: 2 / 2 = 1 bolt.\n"
                 "Total: 2 + 1 = 3 bolts.\n#### 3"),
    "gsm-house": ("He spent 80,000 + 50,000 = 130,000 dollars. The value rose by 150% of 80,000, which is "
                  "120,000, so the house is worth 200,000. Profit: 200,000 - 130,000 = 70,001."),
}

IFEVAL_END = "Is there anything else I can help with?"
IFEVAL = [{"key": 1, "prompt": "Write a short note about rivers. Give it a title in double angular brackets, "
                               "use no commas, and end with the exact phrase 'Is there anything else I can help "
                               "with?'. [ifeval-rivers]",
           "instruction_id_list": ["detectable_format:title", "punctuation:no_comma", "startend:end_checker"],
           "kwargs": [{}, {}, {"end_phrase": IFEVAL_END}]}]
# a title, no comma, but it does not end with the phrase: 2 of the 3 instructions
IFEVAL_REPLIES = {"ifeval-rivers": "<<Rivers>>\n\nRivers carry water from the hills to the sea. They shape valleys "
                                   "and feed towns.\n\nI hope this helps."}

AIME = [{"id": 0, "problem": "Find the sum of all integer bases b > 9 for which 17_b divides 97_b. [aime-bases]",
         "answer": "70"},
        {"id": 1, "problem": "How many ordered pairs (x, y) satisfy the equation? [aime-pairs]", "answer": "117"}]
AIME_REPLIES = {
    "aime-bases": "We need b + 7 to divide 9b + 7 = 9(b + 7) - 56, so b + 7 divides 56 ... b = 21 or 49.\n"
                  "The sum is 21 + 49 = 70.\n\nThe answer is $\\boxed{70}$.",                         # right
    "aime-pairs": "Counting the pairs case by case gives 116.\n\n$\\boxed{116}$",                        # wrong
}


def _lcb_solution(question_id: str) -> str:
    """An instruct model's reply: reasoning, a draft block, then the final program (wrong for mean_*)."""
    if question_id.startswith("sum"):
        final = "import sys\ndata = sys.stdin.read().split()\nprint(sum(map(int, data[1:])))"
    elif question_id.startswith("scale"):
        final = ("class Solution:\n    def scaleAll(self, nums: List[int], k: int) -> List[int]:\n"
                 "        return [x * k for x in nums]")
    else:
        final = "print(2.5)"
    return (f"I will read the input and compute the answer.\n\nA first attempt:\n```python\nprint(0)\n```\n"
            f"That ignores the input. The final program:\n```python\n{final}\n```\n")


# ---------------------------------------------------------------- the scripted model
def _cut_at_stops(text: str, until) -> str:
    """What a backend returns: the generation up to the first stop sequence."""
    stops = [until] if isinstance(until, str) else list(until or [])
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    return text[:min(cuts)] if cuts else text


def _marker(text: str) -> str:
    return text[text.rindex("[") + 1:text.rindex("]")]


def _gpqa_reply(user: str) -> str:
    index = int(_marker(user).split("-")[1])
    _, right, wrong = GPQA_QUESTIONS[index]
    question = user[user.rindex("Question:"):]
    letters = {text: letter for letter, text in
               ((line[1], line[4:]) for line in question.splitlines() if line[:1] == "(" and line[2:3] == ")")}
    letter = letters[right] if GPQA_STYLE[index] != "wrong" else letters[wrong[0]]
    return {"bare": f"({letter})", "the answer is": f"The answer is ({letter})",
            "the answer is.": f"The answer is ({letter}).", "wrong": f"({letter})"}[GPQA_STYLE[index]]


def _reply(task: str, chat: list) -> str:
    user = next(m["content"] for m in reversed(chat) if m["role"] == "user")
    if task.startswith("humaneval"):
        return HUMANEVAL_REPLIES[_marker(user)]
    if task.startswith("gpqa"):
        return _gpqa_reply(user)
    if task.startswith("gsm8k"):
        return GSM8K_REPLIES[_marker(user)]
    if task.startswith("ifeval"):
        return IFEVAL_REPLIES[_marker(user)]
    if task.startswith("aime"):
        return AIME_REPLIES[_marker(user)]
    if task.startswith("livecodebench"):
        question_id = user.split("### Question:\nProblem ", 1)[1].split(":", 1)[0]
        return _lcb_solution(question_id)
    raise AssertionError(f"no reply scripted for {task}")


def _scripted_reply(task: str, chat: list, gen_kwargs: dict) -> str:
    return _cut_at_stops(_reply(task, chat), gen_kwargs.get("until"))


# ---------------------------------------------------------------- the six tasks, run as eval=gen runs them
LOADERS = {  # task -> (splits of the local dataset, livecodebench: its own files)
    "humaneval_instruct": {"test": HUMANEVAL},
    "gpqa_diamond_generative_n_shot": {"train": GPQA},
    "gsm8k": {"train": GSM8K_TRAIN, "test": GSM8K_TEST},
    "ifeval": {"train": IFEVAL},
    "aime25": {"test": AIME},
}


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """One evaluate() of gen.yaml's six tasks, each a local copy of the task eval=gen resolves to."""
    import nltk

    root = tmp_path_factory.mktemp("gen_replay")
    index = task_index.task_manager(None).task_index
    # Each task's documents as JSON files loaded through the datasets cache, as hub datasets are: lm-eval
    # reads a task's documents more than once, and gpqa's process_docs shuffles the choices, which agree
    # between the reads only through the cache of `Dataset.map` (an in-memory dataset reshuffles).
    module = "gen_replay_docs"
    lines = ["import datasets", ""]
    for task, splits in LOADERS.items():
        files = {}
        for split, rows in splits.items():
            files[split] = str(root / "docs" / f"{task}_{split}.jsonl")
            Path(files[split]).parent.mkdir(exist_ok=True)
            Path(files[split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
        lines.append(f"def {task}(**_):\n    return datasets.load_dataset('json', data_files={files!r}, "
                     f"cache_dir={str(root / 'hf_cache')!r})\n")
    (root / f"{module}.py").write_text("\n".join(lines))
    for task in GEN["tasks"]:
        shipped = index[task].yaml_path
        if task == "livecodebench":  # the shipped metadata, reading the local release files
            from lm_eval.tasks._yaml_loader import load_yaml

            metadata = {**load_yaml(shipped, resolve_func=False)["metadata"], "source": str(LCB_DATA),
                        "cache_dir": str(root / "hf_cache")}
            extra = yaml.safe_dump({"metadata": metadata})
        else:
            extra = f"dataset_path: null\ndataset_name: null\ncustom_dataset: !function {module}.{task}\n"
        (root / f"{task}{SUFFIX}.yaml").write_text(f"include: {shipped}\ntask: {task}{SUFFIX}\n{extra}")
    cfg = {**GEN, "include_path": str(root), "allow_code_eval": True,
           "tasks": [t + SUFFIX for t in GEN["tasks"]],
           **{key: {t + SUFFIX: v for t, v in GEN[key].items()} for key in ("num_fewshot", "metrics")}}
    lm = scripted_lm(_scripted_reply)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "make_lm", lambda *args: lm)
        mp.setattr(nltk, "download", lambda *a, **k: False)  # ifeval's import-time download: offline here
        result = harness.evaluate(None, None, cfg)
    return result, lm.requests


def task_of(result, name):
    return result["tasks"][name + SUFFIX]


def test_every_gen_task_ran_with_gen_yaml_settings(replay):
    result, requests = replay
    assert result["gen_tasks"] == [t + SUFFIX for t in GEN["tasks"]] and result["skipped"] == {}
    assert result["mc_tasks"] == [] and result["gen"] is not None
    for task in GEN["tasks"]:
        protocol = task_of(result, task)["protocol"]
        assert protocol["fewshot"] == GEN["num_fewshot"][task] and protocol["chat_template"] is True
        metric = GEN["metrics"].get(task)
        if metric:
            assert f"{protocol['metric']},{protocol['filter']}" == metric == task_of(result, task)["metric"]
    assert result["gen_protocol"] == {t + SUFFIX: task_of(result, t)["protocol"] for t in GEN["tasks"]}


def test_humaneval_instruct_fenced_replies_are_extracted_and_run_in_the_sandbox(replay):
    result, requests = replay
    task = task_of(result, "humaneval_instruct")
    assert task["metric"] == "pass_at_k,create_test" and task["n"] == 3
    assert task["score"] == pytest.approx(2 / 3)  # add and evens pass, neg (wrong) fails
    assert task["protocol"]["variant"].startswith("instruction prompt")
    for chat, gen_kwargs, _ in requests["humaneval_instruct" + SUFFIX]:
        doc = next(d for d in HUMANEVAL if d["prompt"] in chat[-2]["content"])
        assert chat[-2] == {"role": "user", "content": "Write a solution to the following problem and make sure "
                            f"that it passes the tests:\n```python\n{doc['prompt']}\n```\n"}
        # the assistant turn is opened by the prefix, and the model continues it
        assert chat[-1] == {"role": "assistant", "content": f"Here is the completed function:\n```python\n{doc['prompt']}\n"}
        assert "\ndef" in gen_kwargs["until"]


def test_humaneval_instruct_program_is_the_prompt_plus_the_reply_up_to_its_fence():
    from ream_exp.code_tasks.humaneval import build_predictions_instruct, pass_at_k

    doc = HUMANEVAL[0]
    reference = f"{doc['test']}\ncheck({doc['entry_point']})"
    [[program]] = build_predictions_instruct([[HUMANEVAL_REPLIES["he-add"]]], [doc])
    assert program == doc["prompt"] + "    return a + b\n"
    assert pass_at_k([reference], [[program]], k=[1]) == 1.0
    # a model that re-opens a block of its own with the whole function: that function is the program
    reopened = "```python\ndef add(a, b):\n    return b + a\n```\nThis adds."
    [[program]] = build_predictions_instruct([[reopened]], [doc])
    assert pass_at_k([reference], [[program]], k=[1]) == 1.0
    [[wrong]] = build_predictions_instruct([["    return a - b\n```"]], [doc])
    assert pass_at_k([reference], [[wrong]], k=[1]) == 0.0


def test_gpqa_bare_letter_and_the_answer_is_both_score_right(replay):
    result, requests = replay
    task = task_of(result, "gpqa_diamond_generative_n_shot")
    right = sum(style != "wrong" for style in GPQA_STYLE.values())
    assert task["n"] == len(GPQA) and task["score"] == pytest.approx(right / len(GPQA))
    assert task["metric"] == "exact_match,flexible-extract"
    # strict-match needs "The answer is": the bare "(C)" replies, which follow the shots, score 0 there
    strict = sum(style.startswith("the answer is") for style in GPQA_STYLE.values())
    assert task["metrics"]["exact_match,strict-match"] == pytest.approx(strict / len(GPQA))
    for chat, _, _ in requests["gpqa_diamond_generative_n_shot" + SUFFIX]:
        shots = [m["content"] for m in chat if m["role"] == "assistant"]
        assert len(shots) == 5 and all(s in ("(A)", "(B)", "(C)", "(D)") for s in shots)  # 5-shot, no CoT
        assert chat[0]["role"] == "system" and "example questions" in chat[0]["content"]


def test_gsm8k_answer_is_extracted_after_a_long_chain_of_thought_with_5_shots(replay):
    result, requests = replay
    task = task_of(result, "gsm8k")
    assert task["metric"] == "exact_match,flexible-extract" and task["fewshot"] == 5
    assert task["score"] == pytest.approx(2 / 3)  # ducks ("**$18**") and robe ("#### 3") right; house wrong
    assert task["metrics"]["exact_match,strict-match"] == pytest.approx(1 / 3)  # only "#### 3"
    for chat, _, _ in requests["gsm8k" + SUFFIX]:
        shots = [m["content"] for m in chat if m["role"] == "assistant"]
        assert len(shots) == 5 and all("#### " in s for s in shots)


def test_ifeval_is_scored_per_instruction_with_loose_beside_it(replay):
    result, _ = replay
    task = task_of(result, "ifeval")
    assert task["metric"] == "inst_level_strict_acc,none"
    assert task["score"] == pytest.approx(2 / 3)  # title and no comma kept; the closing phrase missing
    assert task["metrics"]["prompt_level_strict_acc,none"] == 0.0
    assert task["metrics"]["inst_level_loose_acc,none"] == pytest.approx(2 / 3)


def test_aime25_is_scored_as_today(replay):
    result, _ = replay
    task = task_of(result, "aime25")
    assert task["metric"] == "exact_match,none" and task["fewshot"] == 0 and task["score"] == 0.5
    assert task["protocol"]["max_gen_toks"] == 32768


def test_livecodebench_scores_the_whole_release_from_the_last_fenced_block(replay):
    result, _ = replay
    task = task_of(result, "livecodebench")
    import importlib.util

    spec = importlib.util.spec_from_file_location("lcb_src", LCB_DATA / "make_problems.py")
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    ids = [p["question_id"] for p in source.PROBLEMS]
    assert task["n"] == len(ids) == 10  # every problem of the release, not a date window
    solvable = [q for q in ids if not q.startswith("mean")]
    assert task["metric"] == "pass_at_1,none" and task["score"] == pytest.approx(len(solvable) / len(ids))
    assert task["protocol"]["variant"] == "release_v6, all contest dates"


# ---------------------------------------------------------------- the protocol record and its setting
def test_gen_yaml_and_paper_yaml_compose_the_papers_protocol():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_EVAL.parent), version_base="1.3"):
        for name in ("gen", "paper"):
            cfg = compose(overrides=[f"+eval={name}"]).eval
            assert "humaneval_instruct" in cfg.tasks and "livecodebench" in cfg.tasks and "humaneval" not in cfg.tasks
            assert cfg.num_fewshot.gsm8k == 5 and cfg.num_fewshot.gpqa_diamond_generative_n_shot == 5
            assert dict(cfg.metrics) == {"ifeval": "inst_level_strict_acc,none",
                                         "gsm8k": "exact_match,flexible-extract",
                                         "gpqa_diamond_generative_n_shot": "exact_match,flexible-extract"}


def test_the_livecodebench_window_is_a_task_of_its_own():
    from lm_eval.tasks._yaml_loader import load_yaml

    index = task_index.task_manager(None).task_index
    whole = load_yaml(index["livecodebench"].yaml_path, resolve_func=False)["metadata"]
    window = load_yaml(index["livecodebench_2502_2505"].yaml_path, resolve_func=False)["metadata"]
    assert (whole["release"], whole["start_date"], whole["end_date"]) == ("release_v6", None, None)
    assert (window["release"], window["start_date"], window["end_date"]) == ("release_v6", "2025-02-01", "2025-05-01")
    assert checks.check_tasks({"name": "w", "tasks": ["livecodebench_2502_2505"], "allow_code_eval": True})


def test_missing_punkt_tab_is_one_config_error_naming_the_command(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # an empty nltk data directory
    with pytest.raises(ConfigError) as caught:
        data_needs.check_runtime_data(GEN)
    message = str(caught.value)
    assert "\n" not in message and "['ifeval']" in message and "python -m nltk.downloader punkt_tab" in message
    data_needs.check_runtime_data({**GEN, "tasks": ["gsm8k", "aime25"]})  # no ifeval: nothing needed
    (tmp_path / "tokenizers" / "punkt_tab").mkdir(parents=True)
    data_needs.check_runtime_data(GEN)  # present: fine
