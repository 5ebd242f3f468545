"""ream_exp.settings: every setting is declared once and checked before any weights load.

Bad values and unknown keys are one ConfigError line naming the setting and what it allows (through
`run()` with the model loader replaced by a failure, and through the `ream-exp` console script); every
shipped option of every group and every sweep passes; the schema changes nothing in the config.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import ream_exp.run as run_module
from ream_exp import PACKAGE_DIR
from ream_exp.calib import build_calibration, validate_calib
from ream_exp.config import ConfigError
from ream_exp.methods import METHODS
from ream_exp.setting_schema import CALIB, EVAL, LOGGER, MODEL, SCHEMA, method_group
from ream_exp.settings import check_settings
from tests.test_config import CONF, make_cfg, options

REAM_EXP = str(Path(sys.executable).parent / "ream-exp")
SWEEPS = PACKAGE_DIR.parent / "sweeps"


@pytest.fixture
def no_model_load(monkeypatch):
    """The weights must never be loaded: any attempt fails the test."""
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: pytest.fail("model loaded despite bad input"))


def _toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, *overrides):
    """The tiny model with local calibration files and the toy eval (its settings are all there)."""
    return make_cfg("model=local", f"model.path={tiny_checkpoint}", "eval=toy", "logger=none", "calib=local",
                    *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()], f"cache_dir={tmp_path / 'c'}",
                    *overrides)


BAD = [
    (["eval.limit=abc"], r"^eval.limit='abc' is not a number: eval.limit is null \(every example\), a positive "
                         r"integer \(examples per task\) or a fraction in \(0, 1\)"),
    (["eval.limit=0"], r"^eval.limit=0 must be positive: eval.limit is null"),
    (["eval.limit=1.5"], r"^eval.limit=1.5 is neither a whole number of examples nor a fraction below 1"),
    (["eval.limit=50.0"], r"^eval.limit=50.0 .*\(for 50 examples write 50\)"),
    (["eval.batch_size=abc"], r"^eval.batch_size='abc' is not a batch size: eval.batch_size is a positive integer, "
                              r"auto or auto:N"),
    (["eval.batch_size=0"], r"^eval.batch_size=0 must be a positive integer: eval.batch_size is"),
    (["eval.batch_size=auto:x"], r"^eval.batch_size='auto:x' is not a batch size"),
    (["eval.max_gen_toks=abc"], r"^eval.max_gen_toks='abc' is not an integer: eval.max_gen_toks is the most tokens"),
    (["eval.max_gen_toks=0"], r"^eval.max_gen_toks=0 must be a positive integer"),
    (["eval.max_gen_toks=-5"], r"^eval.max_gen_toks=-5 must be a positive integer"),
    (["eval.tasks=toy_facts"], r"^eval.tasks='toy_facts' is not a list: eval.tasks is a list of lm-eval task names"),
    (["eval.num_fewshot={toy_facts:x}"], r"^eval.num_fewshot.toy_facts='x' is not an integer"),
    (["eval.backend=vlm"], r"^eval.backend='vlm'; valid: hf, vllm \(did you mean vllm\?\)$"),
    (["eval.log_samples=yes"], r"^eval.log_samples='yes' must be true or false"),
    (["model.dtype=bf16"], r"^model.dtype='bf16'; valid: auto, float32, bfloat16, float16 \(did you mean bfloat16\?\)$"),
    (["model.dtype=float64"], r"^model.dtype='float64'; valid: auto, float32, bfloat16, float16"),
    (["model.stream=1"], r"^model.stream=1 must be true or false"),
    (["model.device_map=gpu"], r"^model.device_map='gpu' is not a device map: model.device_map is null, one of auto"),
    (["device=gpu"], r"^device='gpu'; valid: auto, cpu, cuda, cuda:N \(GPU index N\), mps \(did you mean cuda\?\)$"),
    (["device=cuda:x"], r"^device='cuda:x'; valid: auto, cpu, cuda, cuda:N"),
    (["save=maybe"], r"^save='maybe' must be true or false"),
    (["+metod=reap"], r"^unknown setting metod \(top level\); allowed: baseline, budget, cache_dir, calib, device, "
                      r"eval, logger, method, model, progress, quant, ratio, run_dir, save, seed "
                      r"\(did you mean method\?\)$"),
    (["+method.group_sise=4"], r"^unknown setting method.group_sise \(method=ream_official\); allowed: align, "
                               r"align_cache_mb, align_tokens, .*group_size.* \(did you mean group_size\?\)$"),
    (["+model.dtpye=bfloat16"], r"^unknown setting model.dtpye \(model=local\); allowed: device_map, dtype, .*"
                                r"\(did you mean dtype\?\)$"),
    (["+calib.sources.math.feild=text"], r"^unknown setting calib.sources.math.feild; allowed: field, fields, format"),
    (["+eval.limt=3"], r"^unknown setting eval.limt \(eval=toy\); allowed: allow_code_eval, .* \(did you mean limit\?\)"),
    (["+logger.projct=x"], r"^unknown setting logger.projct \(logger=none\); allowed: entity, group, .*project"),
    (["calib.states_device=gpu"], r"^calib.states_device='gpu'; valid: null, cpu, disk"),
    (["calib.mix=[5,5,5]"], r"^calib.mix=\[5, 5, 5\] sums to 15: each weight is a fraction of calib.n=256 "
                            r"\(int\(calib.n \* weight\) sequences\), so this asks for 3840 sequences, 15 x calib.n"),
    (["calib.mix=[1,1,1]"], r"^calib.mix=\[1, 1, 1\] sums to 3: .* asks for 768 sequences"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_setting_is_one_line_before_any_load(overrides, message, tiny_checkpoint, calib_files, tmp_path,
                                                 no_model_load):
    cfg = _toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message) as caught:
        run_module.run(cfg, tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "plan.json").exists()


@pytest.mark.parametrize("overrides", [["eval.limit=0.5"], ["eval.limit=3"], ["eval.batch_size=auto"],
                                       ["eval.batch_size=auto:4"], ["eval.max_gen_toks=64"], ["device=cpu"],
                                       ["model.dtype=bfloat16"], ["eval.num_fewshot=0"],
                                       ["eval.apply_chat_template={mc: false, gen: true}"],
                                       ["calib.mix={general:0.5,code:0.5}"], ["calib.mix=[0.1,0.2,0.7]"]])
def test_good_settings_pass(overrides, tiny_checkpoint, calib_files, tmp_path):
    check_settings(_toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, *overrides))


def test_a_value_that_cannot_be_resolved_names_its_setting(tmp_path):
    cfg = make_cfg(f"cache_dir={tmp_path}", "+calib.sources.general.split=${oc.env:REAM_TEST_UNSET_VARIABLE}")
    with pytest.raises(ConfigError, match=r"^calib.sources.general.split cannot be resolved: "):
        check_settings(cfg)


def test_the_schema_reads_the_config_and_changes_nothing(tmp_path):
    cfg = make_cfg("model=local", f"model.path={tmp_path}", "eval=none", "logger=none", "calib=local")
    before = OmegaConf.to_yaml(cfg)
    check_settings(cfg)  # model.path and calib.sources.*.path of calib=local: ??? passes here
    assert OmegaConf.to_yaml(cfg) == before


# ---- coverage: every shipped option and sweep passes; every declared key is read by some config ------

@pytest.mark.parametrize("group", ["model", "calib", "method", "eval", "logger"])
def test_every_shipped_option_passes_the_schema(group):
    for option in options(group):
        check_settings(make_cfg(f"{group}={option}"))


def _sweep_params(name: str) -> list[str]:
    """Each value of each swept parameter of sweeps/<name>.yaml, as one override."""
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        cfg = compose(name, overrides=[f"hydra.searchpath=[file://{CONF}]"], return_hydra_config=True)
    params = cfg.hydra.sweeper.get("params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [""] + [f"{o.key_or_group}={value}" for o in parsed for value in o.sweep_string_iterator()]


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEPS.glob("*.yaml")))
def test_every_sweep_passes_the_schema(sweep):
    for override in _sweep_params(sweep):
        with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
            cfg = compose(sweep, overrides=[f"hydra.searchpath=[file://{CONF}]"] + ([override] if override else []))
        check_settings(cfg)


def test_every_key_of_every_option_is_declared():
    """The schema's groups hold every key the shipped configs use (no option relies on tolerance)."""
    groups = {"model": MODEL, "calib": CALIB, "eval": EVAL, "logger": LOGGER}
    for group, schema in groups.items():
        for option in options(group):
            keys = set(make_cfg(f"{group}={option}")[group])
            assert keys <= set(schema.fields), (group, option, keys - set(schema.fields))
    assert set(make_cfg()) <= set(SCHEMA.fields)
    for option in options("method"):
        method = make_cfg(f"method={option}").method
        assert set(method) <= set(method_group(METHODS[method.name], method.name).fields), option


# ---- calibration: what each source gives, said and checked ------------------------------------------

def test_the_calibration_line_says_each_source_count(tiny_checkpoint, calib_files, tmp_path, caplog):
    cfg = _toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, "calib.n=100", "calib.seq_len=32",
                        "calib.mix=[0.5,0.25,0.25]")
    with caplog.at_level(logging.INFO, logger="ream_exp.calib"):
        validate_calib(cfg.calib)
        validate_calib(_toy_eval_cfg(tiny_checkpoint, calib_files, tmp_path, "calib.n=128", "calib.seq_len=32",
                                     "calib.mix=[0.4,0.3,0.3]").calib)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration:")]
    assert lines == ["calibration: 100 sequences x 32 tokens: general 50, math 25, code 25",
                     "calibration: 127 sequences x 32 tokens: general 51, math 38, code 38 "
                     "(int(calib.n * weight) of calib.n=128)"]


def test_a_source_that_runs_out_names_calib_mix(calib_files, tmp_path):
    from ream_exp.moe.tiny import tiny_tokenizer

    cfg = _toy_eval_cfg(tmp_path, calib_files, tmp_path, "calib.n=100", "calib.seq_len=16", "calib.mix=[0,0.9,0]")
    with pytest.raises(ConfigError, match=r"^calib.mix asks source math for 90 sequences of 16 tokens, but "
                                          r"calibration source '.*math.jsonl' gave only \d+ of 90 ") as caught:
        build_calibration(cfg.calib, tiny_tokenizer())
    assert "\n" not in str(caught.value)


def test_a_read_source_without_a_path_is_named(tmp_path):
    cfg = make_cfg("calib=local", "calib.sources.general.path=g.jsonl", "calib.sources.code.path=c.jsonl")
    with pytest.raises(ConfigError, match=r"^calib.mix asks for 76 math sequences but calib.sources.math.path is "
                                          r"not set"):
        validate_calib(cfg.calib)


# ---- lm-eval's notice that ream-exp's humaneval replaces its own ---------------------------------------

def test_own_humaneval_override_is_not_logged(caplog):
    from ream_exp.evaluation import task_index

    task_index.task_manager.cache_clear()
    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        manager = task_index.task_manager(None)
    assert "humaneval" in manager.all_tasks
    assert not [r for r in caplog.records if "overrides existing task" in r.getMessage()]


def test_other_task_overrides_are_still_logged():
    from ream_exp.evaluation import task_index
    from ream_exp.code_tasks import CODE_TASKS_DIR

    def record(path):
        return logging.LogRecord("lm_eval.tasks._index", logging.WARNING, "x", 1,
                                 "Task '%s' from %s overrides existing task from %s",
                                 ("humaneval", path, "/site-packages/lm_eval/tasks/humaneval"), None)

    keep = task_index._OwnOverrides().filter
    assert not keep(record(CODE_TASKS_DIR / "humaneval.yaml"))
    assert keep(record(Path("/my/tasks/humaneval.yaml")))


# ---- the console script: one line on stderr, nothing of a run written --------------------------------

def _cli(tmp_path, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    # this checkout's ream_exp, whichever checkout the environment's editable install points at
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(PACKAGE_DIR.parent))
    cmd = [REAM_EXP, "logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)


@pytest.mark.parametrize("override,line", [
    ("+metod=reap", "error: unknown setting metod (top level); allowed: baseline, budget, cache_dir, calib, device, "
                    "eval, logger, method, model, progress, quant, ratio, run_dir, save, seed (did you mean method?)"),
    ("metod=reap", "error: unknown setting metod (top level); allowed: baseline, budget, cache_dir, calib, device, "
                   "eval, logger, method, model, progress, quant, ratio, run_dir, save, seed (did you mean method?)"),
    ("method.group_sise=4", "error: unknown setting method.group_sise (method=ream_official); allowed: align, "
                            "align_cache_mb, align_tokens, gate_output, gated_sim, group_size, grouping, merge, merge_density, "
                            "merge_max_iter, merge_rank, merge_tol, name, pca_dim, pca_seed, protect, saliency, "
                            "saliency_form, sequential, sim_tokens (did you mean group_size?)"),
    ("eval.limit=abc", "error: eval.limit='abc' is not a number: eval.limit is null (every example), a positive "
                       "integer (examples per task) or a fraction in (0, 1) of each task's examples"),
    ("model.dtype=bf16", "error: model.dtype='bf16'; valid: auto, float32, bfloat16, float16 (did you mean bfloat16?)"),
    ("device=gpu", "error: device='gpu'; valid: auto, cpu, cuda, cuda:N (GPU index N), mps (did you mean cuda?)"),
    # after lm-eval's task index was built (check_tasks): its humaneval notice is not printed either
    ("calib.mix=[5,5,5]", "error: calib.mix=[5, 5, 5] sums to 15: each weight is a fraction of calib.n=128 "
                          "(int(calib.n * weight) sequences), so this asks for 1920 sequences, 15 x calib.n; give "
                          "weights summing to at most 1 (e.g. [0.4,0.3,0.3]) and the total as calib.n"),
])
def test_cli_bad_setting_is_one_error_line_and_no_run(override, line, tmp_path):
    done = _cli(tmp_path, override)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [line]
    assert "overrides existing task" not in done.stdout + done.stderr
    written = {p.name for p in (tmp_path / "run").iterdir()} if (tmp_path / "run").exists() else set()
    assert not written & {"config.yaml", "plan.json", "checkpoint", "metrics.json", "lm_eval"}, written
