"""ream_exp/evaluation/ on a tiny real Qwen3-MoE and the tiny lm-eval tasks in tests/data/tiny_tasks/.

    pytest tests/test_evaluate.py

CPU and offline: the model and tokenizer are built here, the task data are local JSONL files, and
lm-eval's task index is read from the installed package. lm_eval.simple_evaluate is wrapped by a spy
so that every score can be checked against what lm-eval itself reported.
"""

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from ream_exp.evaluation import checks, code_policy, entries, eval_config, harness, scores, task_index  # noqa: E402
from ream_exp.config import ConfigError  # noqa: E402

TASK_DIR = Path(__file__).resolve().parent / "data" / "tiny_tasks"
CONF_EVAL = Path(__file__).resolve().parents[1] / "conf" / "eval"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


def tiny_tokenizer():
    """Character-level tokenizer over printable ASCII with pad/bos/eos/unk and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", "\n"])}
    vocab.update({chr(c): len(vocab) + i for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_moe(vocab_size: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # a visible spread of weights, so predictions differ from doc to doc
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    return model


def eval_cfg(tasks, **overrides):
    cfg = {"name": "tiny", "tasks": list(tasks), "include_path": str(TASK_DIR), "limit": None, "batch_size": 4,
           "num_fewshot": None, "max_gen_toks": None, "allow_code_eval": False, "apply_chat_template": False,
           "backend": "hf"}
    return {**cfg, **overrides}


class Spy:
    """Wraps lm_eval.simple_evaluate: records its arguments and its raw output."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, **kwargs):
        raw = self.real(**kwargs)
        self.calls.append({"kwargs": kwargs, "raw": raw})
        return raw

    def call_for(self, task: str) -> dict:
        return next(c for c in self.calls if task in c["raw"]["results"])


@pytest.fixture
def spy(monkeypatch):
    import lm_eval

    recorder = Spy(lm_eval.simple_evaluate)
    monkeypatch.setattr(lm_eval, "simple_evaluate", recorder)
    return recorder


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = tiny_tokenizer()
    return tiny_moe(len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def suite(model_and_tokenizer):
    """One evaluation of MC, grouped MC, GEN and an unsafe task; chat template on the GEN side only."""
    import lm_eval

    model, tokenizer = model_and_tokenizer
    cfg = eval_cfg(["tiny_mc", "tiny_group", "tiny_gen", "tiny_unsafe"],
                   apply_chat_template={"mc": False, "gen": True})
    with pytest.MonkeyPatch.context() as mp:
        recorder = Spy(lm_eval.simple_evaluate)
        mp.setattr(lm_eval, "simple_evaluate", recorder)
        result = harness.evaluate(model, tokenizer, cfg)
    return result, recorder


def test_kind_follows_lm_eval_output_type(suite):
    result, recorder = suite
    for name, entry in result["tasks"].items():
        output_type = recorder.call_for(name)["raw"]["configs"].get(name, {}).get("output_type")
        if output_type is not None:  # groups have no config of their own
            assert entry["kind"] == ("gen" if output_type == "generate_until" else "mc"), name
    kinds = {name: entry["kind"] for name, entry in result["tasks"].items()}
    assert kinds == {"tiny_mc": "mc", "tiny_group": "mc", "tiny_gen": "gen"}


def test_scores_are_the_primary_metrics_lm_eval_reported(suite):
    result, recorder = suite
    mc, gen = result["tasks"]["tiny_mc"], result["tasks"]["tiny_gen"]
    mc_raw = recorder.call_for("tiny_mc")["raw"]
    gen_raw = recorder.call_for("tiny_gen")["raw"]
    reported = mc_raw["results"]["tiny_mc"]
    assert reported["acc,none"] != reported["acc_norm,none"]  # else this test could not tell them apart
    assert mc["metric"] == "acc,none" and mc["score"] == pytest.approx(reported["acc,none"])
    # tiny_gen's first metric is lower_share (exact_match comes second).
    assert gen["metric"] == "lower_share,none"
    assert gen["score"] == pytest.approx(gen_raw["results"]["tiny_gen"]["lower_share,none"])
    assert (mc["n"], gen["n"]) == (12, 6)
    assert all(0.0 <= t["score"] <= 1.0 for t in result["tasks"].values())


def test_group_counts_once_by_its_size_weighted_aggregate(suite):
    result, recorder = suite
    assert not any(name.startswith("tiny_group_") for name in result["tasks"])
    raw = recorder.call_for("tiny_group")["raw"]
    assert "tiny_group" in raw["groups"] and raw["group_subtasks"]["tiny_group"] == ["tiny_group_a", "tiny_group_b"]
    a, b = raw["results"]["tiny_group_a"]["acc,none"], raw["results"]["tiny_group_b"]["acc,none"]
    assert a != b  # else size weighting would be invisible
    group = result["tasks"]["tiny_group"]
    assert group["score"] == pytest.approx((12 * a + 6 * b) / 18)
    assert group["n"] == 18


def test_mc_gen_avg_are_means_of_the_task_scores(suite):
    result, _ = suite
    tasks = result["tasks"]
    mc = (tasks["tiny_mc"]["score"] + tasks["tiny_group"]["score"]) / 2
    gen = tasks["tiny_gen"]["score"]
    assert result["mc"] == pytest.approx(mc) and result["gen"] == pytest.approx(gen)
    assert result["avg"] == pytest.approx((mc + gen) / 2)
    # percent values are rounded to 2 decimals: off by at most 0.005
    assert result["percent"]["avg"] == pytest.approx(100 * (mc + gen) / 2, abs=0.006)
    assert result["mc_tasks"] == ["tiny_mc", "tiny_group"] and result["gen_tasks"] == ["tiny_gen"]
    assert json.loads(json.dumps(result)) == result


def test_chat_template_setting_is_applied_per_kind(suite):
    _, recorder = suite
    assert recorder.call_for("tiny_mc")["kwargs"]["apply_chat_template"] is False
    assert recorder.call_for("tiny_gen")["kwargs"]["apply_chat_template"] is True


def test_unsafe_task_is_skipped_in_a_mixed_suite(suite):
    result, recorder = suite
    assert "tiny_unsafe" not in result["tasks"] and "allow_code_eval" in result["skipped"]["tiny_unsafe"]
    assert all(c["kwargs"]["confirm_run_unsafe_code"] is False for c in recorder.calls)
    assert "tiny_unsafe" not in result["gen_tasks"]  # a skipped task is not part of the task set


def test_unsafe_task_alone_is_skipped_with_a_warning(model_and_tokenizer, spy, caplog):
    caplog.set_level(logging.WARNING, logger=code_policy.__name__)
    result = harness.evaluate(*model_and_tokenizer, eval_cfg(["tiny_unsafe"]))
    assert result["tasks"] == {} and result["avg"] is None and spy.calls == []
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "tiny_unsafe" in warning and "allow_code_eval" in warning


def test_contained_code_task_runs_when_allowed(model_and_tokenizer, spy, monkeypatch):
    from ream_exp import sandbox

    programs = []

    def recording_run_program(source, limits=sandbox.Limits()):
        programs.append(source)
        return real_run_program(source, limits)

    real_run_program = sandbox.run_program
    monkeypatch.setattr(sandbox, "run_program", recording_run_program)
    result = harness.evaluate(*model_and_tokenizer, eval_cfg(["tiny_contained"], allow_code_eval=True, limit=2))
    assert result["tasks"]["tiny_contained"]["kind"] == "gen" and result["tasks"]["tiny_contained"]["n"] == 2
    assert len(programs) == 2  # every response ran through the sandbox
    assert spy.calls[0]["kwargs"]["confirm_run_unsafe_code"] is True
    reported = spy.calls[0]["raw"]["results"]["tiny_contained"]["ran,none"]
    assert result["tasks"]["tiny_contained"]["score"] == reported


def test_uncontained_code_task_is_refused_when_allowed(model_and_tokenizer, spy):
    with pytest.raises(ValueError, match=r"tiny_unsafe.*outside ream_exp.sandbox"):
        harness.evaluate(*model_and_tokenizer, eval_cfg(["tiny_mc", "tiny_unsafe"], allow_code_eval=True))
    assert spy.calls == []  # refused before anything was generated or scored


def test_uncontained_code_task_is_refused_before_any_model_work():
    # check_tasks runs in validate(), before the weights load: it reads the task YAML's hooks only
    cfg = eval_cfg(["tiny_mc", "tiny_unsafe"], allow_code_eval=True)
    with pytest.raises(ConfigError, match=r"\['tiny_unsafe'\] execute model-written code outside ream_exp.sandbox"):
        checks.check_tasks(cfg)
    allowed = eval_cfg(["tiny_mc", "tiny_contained"], allow_code_eval=True)
    assert checks.check_tasks(allowed) == ["tiny_mc", "tiny_contained"]
    assert checks.check_tasks(eval_cfg(["tiny_unsafe"], allow_code_eval=False)) == ["tiny_unsafe"]  # skipped, not run


def test_per_task_fewshot_metric_override_and_gen_cap(model_and_tokenizer, spy):
    cfg = eval_cfg(["tiny_mc", "tiny_gen"], limit=3, num_fewshot={"tiny_mc": 2},
                   metrics={"tiny_gen": "exact_match"}, max_gen_toks=2)
    result = harness.evaluate(*model_and_tokenizer, cfg)
    assert spy.call_for("tiny_mc")["raw"]["n-shot"]["tiny_mc"] == 2
    gen_call = spy.call_for("tiny_gen")
    assert gen_call["raw"]["n-shot"]["tiny_gen"] == 0
    assert gen_call["kwargs"]["gen_kwargs"] == {"max_gen_toks": 2}
    assert result["tasks"]["tiny_gen"]["metric"] == "exact_match,none"
    assert result["tasks"]["tiny_gen"]["score"] == gen_call["raw"]["results"]["tiny_gen"]["exact_match,none"]
    assert result["tasks"]["tiny_mc"]["n"] == 3


def test_eval_none_never_touches_lm_eval(monkeypatch):
    import lm_eval

    def forbidden(*args, **kwargs):
        raise AssertionError("lm-eval was used for eval=none")

    monkeypatch.setattr(lm_eval, "simple_evaluate", forbidden)
    asked = task_index.task_manager.cache_info()  # every module reaches lm-eval's task index through it
    none_cfg = yaml.safe_load((CONF_EVAL / "none.yaml").read_text())
    for cfg in (none_cfg, {"name": "mc", "tasks": []}, None):
        result = harness.evaluate(object(), object(), cfg)
        assert result["tasks"] == {} and result["mc"] is None and result["gen"] is None and result["avg"] is None
    assert task_index.task_manager.cache_info() == asked, "lm-eval's task index was read for eval=none"


def test_unknown_task_fails_before_any_model_work(spy):
    cfg = eval_cfg(["tiny_mc", "no_such_task_xyz"])
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        checks.check_tasks(cfg)
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        harness.evaluate(object(), object(), cfg)  # not a model: any model work would fail differently
    assert spy.calls == []


def test_stray_per_task_settings_are_rejected():
    with pytest.raises(ValueError, match="tiny_gen"):
        checks.check_tasks(eval_cfg(["tiny_mc"], num_fewshot={"tiny_gen": 5}))
    with pytest.raises(ValueError, match="tiny_typo"):
        checks.check_tasks(eval_cfg(["tiny_mc"], metrics={"tiny_typo": "acc"}))


def test_vllm_backend_needs_vllm_and_a_checkpoint(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def vllm_spec(found):
        return lambda name, *args: (object() if found else None) if name == "vllm" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", vllm_spec(False))
    with pytest.raises(ConfigError, match="vllm"):
        checks.check_tasks(eval_cfg(["tiny_gen"], backend="vllm"))
    monkeypatch.setattr(importlib.util, "find_spec", vllm_spec(True))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        harness.evaluate(object(), object(), eval_cfg(["tiny_gen"], backend="vllm"))


def test_vllm_is_split_over_tensor_parallel_size_gpus(monkeypatch):
    import importlib.util
    import sys
    import types

    made = {}
    fake = types.ModuleType("lm_eval.models.vllm_causallms")  # lm-eval's module imports vllm, absent here
    fake.VLLM = lambda **kwargs: made.update(kwargs) or "vllm lm"
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", fake)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "vllm" else real_find_spec(name, *args))
    cfg = eval_cfg(["tiny_gen"], backend="vllm", tensor_parallel_size=8, vllm_args={"max_model_len": 4096})
    assert harness.make_lm("gen", None, None, cfg, "ckpt") == "vllm lm"
    assert set(harness.LM_BUILDERS) == set(checks.BACKENDS)  # every backend a config may name has a builder
    assert made == {"pretrained": "ckpt", "batch_size": 4, "tensor_parallel_size": 8, "max_model_len": 4096}
    harness.make_lm("gen", None, None, eval_cfg(["tiny_gen"], backend="vllm"), "ckpt")
    assert made["tensor_parallel_size"] == 1


@pytest.mark.parametrize("overrides, message", [
    ({"tensor_parallel_size": 0}, "eval.tensor_parallel_size=0 must be a positive integer"),
    ({"tensor_parallel_size": "two"}, "eval.tensor_parallel_size='two' is not an integer"),
    ({"vllm_args": {"tensor_parallel_size": 2}}, "set eval.tensor_parallel_size instead"),
])
def test_bad_tensor_parallel_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        checks.check_tasks(eval_cfg(["tiny_gen"], **overrides))


@pytest.mark.parametrize("path", sorted(CONF_EVAL.glob("*.yaml")), ids=lambda p: p.stem)
def test_conf_eval_tasks_exist_in_lm_eval(path):
    """Every task name in conf/eval is known to lm-eval's local index (no network needed)."""
    from omegaconf import OmegaConf

    import ream_exp.config  # noqa: F401  (the ${pkg:...} resolver used by eval/toy.yaml)

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert checks.check_tasks(cfg) == ([] if cfg["name"] == "none" else cfg["tasks"])


def test_paper_suite_is_mc_plus_gen_and_composes():
    from hydra import compose, initialize_config_dir

    load = {name: yaml.safe_load((CONF_EVAL / f"{name}.yaml").read_text()) for name in ("mc", "gen", "paper", "none")}
    assert load["paper"]["tasks"] == load["mc"]["tasks"] + load["gen"]["tasks"]
    assert load["paper"]["num_fewshot"] == load["gen"]["num_fewshot"]
    assert load["paper"]["metrics"] == load["gen"]["metrics"]  # the GEN protocol (docs/algorithms.md)
    with initialize_config_dir(config_dir=str(CONF_EVAL.parent), version_base="1.3"):
        for name in ("mc", "gen", "paper", "none"):
            cfg = compose(overrides=[f"+eval={name}"])
            assert cfg.eval.name == name and list(cfg.eval.tasks) == load[name]["tasks"]


def test_gen_suite_is_the_papers_six_tasks_with_code_run_contained():
    """GEN = ifeval, aime25, gsm8k (5-shot), gpqa_diamond (5-shot), humaneval_instruct, livecodebench v6
    (docs/algorithms.md, "GEN protocol"); the two code-executing ones are ream-exp's tasks, scored by
    sandbox.contained hooks (as are their alternatives, humaneval and livecodebench_2502_2505)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from ream_exp.sandbox import is_contained

    gen = yaml.safe_load((CONF_EVAL / "gen.yaml").read_text())
    assert gen["tasks"] == ["ifeval", "aime25", "gsm8k", "gpqa_diamond_generative_n_shot", "humaneval_instruct",
                            "livecodebench"]
    assert gen["num_fewshot"] == {name: 5 if name.startswith(("gpqa", "gsm8k")) else 0 for name in gen["tasks"]}
    index = task_index.task_manager(None).task_index
    for name in ("humaneval", "humaneval_instruct", "livecodebench", "livecodebench_2502_2505"):
        config = load_yaml(index[name].yaml_path, resolve_func=True)
        hooks = [config.get("process_results")] + [m["metric"] for m in config["metric_list"]]
        assert config["unsafe_code"] and any(callable(h) and is_contained(h) for h in hooks)


def test_summarise_handles_one_side_only():
    only_mc = scores.summarise({"a": {"score": 0.25, "kind": "mc"}, "b": {"score": 0.75, "kind": "mc"}})
    assert only_mc["mc"] == 0.5 and only_mc["gen"] is None and only_mc["avg"] == 0.5
    assert only_mc["mc_tasks"] == ["a", "b"] and only_mc["gen_tasks"] == []
    only_gen = scores.summarise({"g": {"score": 0.1, "kind": "gen"}})
    assert math.isclose(only_gen["avg"], 0.1) and only_gen["percent"]["gen"] == 10.0


def test_a_missing_metric_makes_its_suite_mean_none(caplog):
    caplog.set_level(logging.ERROR, logger=scores.__name__)
    tasks = {"a": {"score": 0.5, "kind": "mc"}, "g": {"score": 0.6, "kind": "gen"},
             "x": {"score": None, "kind": "gen"}}
    result = scores.summarise(tasks)
    # never the mean over the tasks that happen to have a score (0.6 here)
    assert result["gen"] is None and result["avg"] is None and result["percent"]["gen"] is None
    assert result["mc"] == 0.5 and result["gen_tasks"] == ["g", "x"] and result["tasks"] == tasks
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "GEN" in errors and "'x'" in errors


def test_humaneval_is_replaced_by_the_contained_task():
    """`humaneval` resolves to ream_exp/code_tasks/humaneval.yaml: lm-eval's task settings, scored by
    the sandbox's pass@k."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    from ream_exp.code_tasks import CODE_TASKS_DIR
    from ream_exp.sandbox import is_contained

    ours = CODE_TASKS_DIR / "humaneval.yaml"
    assert Path(task_index.task_manager(None).task_index["humaneval"].yaml_path).resolve() == ours.resolve()
    builtin = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml", resolve_func=False)
    mine = load_yaml(ours, resolve_func=True)
    kept = ["task", "dataset_path", "unsafe_code", "output_type", "test_split", "doc_to_text", "doc_to_target",
            "generation_kwargs", "repeats", "num_fewshot"]
    assert {k: mine[k] for k in kept} == {k: builtin[k] for k in kept}
    assert [m["k"] for m in mine["metric_list"]] == [m["k"] for m in builtin["metric_list"]]
    metric = mine["metric_list"][0]["metric"]
    assert metric.__name__ == "pass_at_k" and is_contained(metric)  # reported as pass_at_k,create_test
    # humaneval_instruct: lm-eval's instruction prompt and assistant prefix, the same scoring in the sandbox
    ours = CODE_TASKS_DIR / "humaneval_instruct.yaml"
    assert Path(task_index.task_manager(None).task_index["humaneval_instruct"].yaml_path).resolve() == ours.resolve()
    builtin = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval_instruct.yaml",
                        resolve_func=False)
    mine_instruct = load_yaml(ours, resolve_func=True)
    assert {k: mine_instruct[k] for k in ("task", "doc_to_text", "gen_prefix")} == \
        {k: builtin[k] for k in ("task", "doc_to_text", "gen_prefix")}
    assert is_contained(mine_instruct["metric_list"][0]["metric"])


HUMANEVAL_LIKE = [  # HumanEval's fields; the prompts end in a comment, so short completions stay inert
    {"task_id": "t/0", "prompt": "def one():\n    return 1\n# ", "entry_point": "one",
     "test": "def check(candidate):\n    assert candidate() == 1\n"},
    {"task_id": "t/1", "prompt": "def two():\n    return 1\n# ", "entry_point": "two",
     "test": "def check(candidate):\n    assert candidate() == 2\n"},
]


def test_contained_humaneval_scores_through_lm_eval(model_and_tokenizer, spy, monkeypatch, tmp_path):
    """The shipped humaneval config, run by lm-eval on local HumanEval-shaped problems: every
    candidate goes through the sandbox and the score lands under pass_at_k,create_test."""
    from ream_exp.code_tasks import CODE_TASKS_DIR
    from ream_exp.code_tasks import humaneval as contained_humaneval

    (tmp_path / "local_problems.py").write_text(
        "from datasets import Dataset, DatasetDict\n"
        f"def load(**_):\n    return DatasetDict({{'test': Dataset.from_list({HUMANEVAL_LIKE!r})}})\n")
    (tmp_path / "humaneval_local.yaml").write_text(
        f"include: {CODE_TASKS_DIR / 'humaneval.yaml'}\ntask: humaneval_local\n"
        "dataset_path: null\ncustom_dataset: !function local_problems.load\n")
    programs = []
    real_run_program = contained_humaneval.run_program

    def recording_run_program(source, limits):
        programs.append(source)
        return real_run_program(source, limits)

    monkeypatch.setattr(contained_humaneval, "run_program", recording_run_program)
    cfg = eval_cfg(["humaneval_local"], include_path=str(tmp_path), allow_code_eval=True, max_gen_toks=2)
    result = harness.evaluate(*model_and_tokenizer, cfg)
    task = result["tasks"]["humaneval_local"]
    reported = spy.calls[0]["raw"]["results"]["humaneval_local"]
    assert task["metric"] == "pass_at_k,create_test" and task["score"] == reported["pass_at_k,create_test"]
    assert task["n"] == 2 and result["gen_tasks"] == ["humaneval_local"] and result["gen"] == task["score"]
    assert len(programs) == 2
    for doc, program in zip(HUMANEVAL_LIKE, sorted(programs)):
        assert program.startswith(doc["prompt"]) and program.endswith(f"{doc['test']}\ncheck({doc['entry_point']})\n")
    assert task["score"] in (0.0, 0.5)  # t/1 can never pass; t/0 passes unless the completion broke it


# ---------------------------------------------------------------- standard errors, lm-eval's own files

def test_stderrs_are_lm_evals_and_the_suite_formula_on_a_fake_result():
    """_score reads the stderr lm-eval reports beside the primary metric; summarise combines them as
    sqrt(sum SE_i^2) / k per suite and sqrt(SE_MC^2 + SE_GEN^2) / 2 for AVG, computed here by hand."""
    class Leaf:
        def __init__(self, name):
            self.task_name = name

    def entry(name, kind, metric):
        return entries.Entry(name, name, None, [Leaf(name)], kind, metric)

    raw = {"results": {"a": {"acc,none": 0.5, "acc_stderr,none": 0.03, "acc_norm,none": 0.9,
                             "acc_norm_stderr,none": 0.5},
                       "b": {"acc,none": 0.7, "acc_stderr,none": 0.04},
                       "g": {"exact_match,flexible-extract": 0.2, "exact_match_stderr,flexible-extract": 0.05,
                             "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.9},
                       "h": {"pass@1,none": 0.4, "pass@1_stderr,none": "N/A"}},
           "n-samples": {n: {"effective": 10} for n in "abgh"}, "n-shot": {"a": 0, "b": 0, "g": 5, "h": 0}}
    tasks = {"a": scores.task_score(entry("a", "mc", "acc,none"), raw),
             "b": scores.task_score(entry("b", "mc", "acc,none"), raw),
             "g": scores.task_score(entry("g", "gen", "exact_match,flexible-extract"), raw)}
    assert [tasks[n]["stderr"] for n in "abg"] == [0.03, 0.04, 0.05]
    assert tasks["g"]["fewshot"] == 5 and tasks["a"]["n"] == 10
    result = scores.summarise(tasks)
    assert result["mc_stderr"] == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)  # 0.025
    assert result["gen_stderr"] == pytest.approx(0.05)
    assert result["avg_stderr"] == pytest.approx(math.sqrt(0.025 ** 2 + 0.05 ** 2) / 2)
    assert result["percent"]["mc_stderr"] == pytest.approx(2.5) and result["percent"]["mc"] == 60.0
    # a task whose stderr lm-eval left "N/A" has none, and makes its suite's stderr unknown, not smaller
    tasks["h"] = scores.task_score(entry("h", "gen", "pass@1,none"), raw)
    assert tasks["h"]["stderr"] is None
    result = scores.summarise(tasks)
    assert result["gen"] == pytest.approx(0.3) and result["gen_stderr"] is None and result["avg_stderr"] is None
    assert result["mc_stderr"] == pytest.approx(0.025)


def test_stderrs_from_a_real_lm_eval_run_match_the_logged_samples(model_and_tokenizer, spy, tmp_path):
    """One real lm-eval run with log_samples: each task's stderr is the sample standard deviation of its
    per-item scores over sqrt(n) (recomputed from lm-eval's samples files), the suite's the formula above,
    and the EvaluationTracker wrote its results and samples files into output_dir."""
    out = tmp_path / "lm_eval"
    cfg = eval_cfg(["tiny_mc", "tiny_group", "tiny_gen"], limit=5, log_samples=True, bootstrap_iters=10)
    result = harness.evaluate(*model_and_tokenizer, cfg, output_dir=out)
    assert all(c["kwargs"]["bootstrap_iters"] == 10 and c["kwargs"]["log_samples"] for c in spy.calls)
    results = {p.name.split("_")[1]: p for p in out.glob("results_*.json")}
    assert set(results) == {"mc", "gen"}
    written = json.loads(results["mc"].read_text())
    assert written["results"]["tiny_mc"]["acc_stderr,none"] == pytest.approx(result["tasks"]["tiny_mc"]["stderr"])

    def per_item(task, metric):
        [path] = out.glob(f"samples_{task}_*.jsonl")
        return [json.loads(line)[metric] for line in path.read_text().splitlines()]

    def se(values):
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))

    mc_items, gen_items = per_item("tiny_mc", "acc"), per_item("tiny_gen", "lower_share")
    assert len(mc_items) == 5 and len(gen_items) == 5
    tasks = result["tasks"]
    assert tasks["tiny_mc"]["stderr"] == pytest.approx(se(mc_items), rel=1e-12)
    assert tasks["tiny_gen"]["stderr"] == pytest.approx(se(gen_items), rel=1e-12)
    assert tasks["tiny_mc"]["stderr"] > 0 and tasks["tiny_gen"]["stderr"] > 0  # else nothing was checked
    # the group: lm-eval's pooled stderr of its size-weighted members (5 items each here)
    a, b = per_item("tiny_group_a", "acc"), per_item("tiny_group_b", "acc")
    pooled = math.sqrt(sum((len(x) - 1) * se(x) ** 2 * len(x) for x in (a, b)) / (len(a) + len(b) - 2)
                       / (len(a) + len(b)))
    assert tasks["tiny_group"]["stderr"] == pytest.approx(pooled, rel=1e-9)
    assert result["mc_stderr"] == pytest.approx(math.hypot(tasks["tiny_mc"]["stderr"], pooled) / 2)
    assert result["gen_stderr"] == pytest.approx(tasks["tiny_gen"]["stderr"])
    assert result["limit"] == 5 and result["bootstrap_iters"] == 10
    assert result["percent"]["gen_stderr"] == pytest.approx(100 * result["gen_stderr"], abs=6e-4)


def test_without_log_samples_only_results_files_are_written(model_and_tokenizer, tmp_path):
    result = harness.evaluate(*model_and_tokenizer, eval_cfg(["tiny_mc"], limit=3), output_dir=tmp_path / "o")
    names = [p.name for p in (tmp_path / "o").iterdir()]
    assert len(names) == 1 and names[0].startswith("results_mc_") and names[0].endswith(".json")
    assert result["bootstrap_iters"] == eval_config.DEFAULT_BOOTSTRAP_ITERS and result["tasks"]["tiny_mc"]["stderr"] > 0


def test_bootstrap_iters_zero_turns_stderrs_off(model_and_tokenizer):
    result = harness.evaluate(*model_and_tokenizer, eval_cfg(["tiny_mc", "tiny_gen"], limit=3, bootstrap_iters=0))
    assert result["tasks"]["tiny_mc"]["stderr"] is None and result["mc_stderr"] is None
    assert result["mc"] is not None and result["avg_stderr"] is None


@pytest.mark.parametrize("overrides, message", [
    ({"bootstrap_iters": -1}, "eval.bootstrap_iters=-1 must be 0 or more"),
    ({"bootstrap_iters": 1.5}, "eval.bootstrap_iters=1.5 is not an integer"),
    ({"log_samples": "yes"}, "eval.log_samples='yes': choose true or false"),
])
def test_bad_stderr_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        checks.check_tasks(eval_cfg(["tiny_mc"], **overrides))
