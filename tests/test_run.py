"""`run(cfg)` end to end on a tiny model with tiny local lm-eval tasks, and the documented CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ream_exp.moe import apply_plan, moe_layers
from ream_exp.moe.tiny import tiny_batch
from ream_exp.plan import Plan
from ream_exp.run import run
from tests.test_config import make_cfg

TINY_TASKS = Path(__file__).parent / "data" / "tiny_tasks"


def _cfg(tiny_checkpoint, calib_files, tmp_path, *extra):
    return make_cfg(
        "model=local", f"model.path={tiny_checkpoint}", "calib=local", "calib.n=16", "calib.seq_len=32",
        *[f"calib.sources.{d}.path={p}" for d, p in calib_files.items()],
        "eval=mc", "eval.name=tiny", "eval.tasks=[tiny_mc,tiny_gen]", f"eval.include_path={TINY_TASKS}",
        "eval.batch_size=4", "logger=wandb", f"cache_dir={tmp_path / 'cache'}", "progress=false", *extra)


def test_run_end_to_end(tiny_checkpoint, calib_files, tmp_path):
    out = tmp_path / "run"
    metrics = run(_cfg(tiny_checkpoint, calib_files, tmp_path, "method=reap", "ratio=0.5"), out)
    for name in ("config.yaml", "plan.json", "metrics.json", "checkpoint/config.json", "checkpoint/tokenizer.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["status"] == "done" and saved["experts_before"] == 8 and saved["experts_after"] == 4
    assert saved["params_after"] < saved["params_before"]
    assert {"load", "calibrate", "compress", "save", "evaluate", "baseline_eval"} <= set(saved["timings"])
    assert set(saved["eval"]["tasks"]) == {"tiny_mc", "tiny_gen"} and saved["eval"]["mc"] is not None
    assert saved["baseline"]["tasks"].keys() == saved["eval"]["tasks"].keys()
    assert saved["baseline"]["weights"] == saved["weights_before"] and saved["baseline"]["peak_memory_bytes"] is None
    assert saved["weights"]["bytes"] < saved["weights_before"]["bytes"]  # measured: docs/bytes.md
    assert saved["calib_tokens"] == int(16 * 32 * 0.9) or saved["calib_tokens"] > 0

    # the checkpoint is the original model with plan.json applied, bit for bit
    plan = Plan.load(out / "plan.json")
    assert all(len(lp.keep) == 4 and len(lp.saliency) == 8 for lp in plan.layers)
    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    apply_plan(original, plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    assert [l.num_experts for l in moe_layers(reloaded)] == [4] * len(moe_layers(reloaded))
    ids, mask = tiny_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           original(input_ids=ids, attention_mask=mask).logits)
    assert any(Path(out).rglob("*.wandb")), "the offline W&B run lives in the run directory"

    # the uncompressed model's scores are cached: a second run does not evaluate them again
    again = run(_cfg(tiny_checkpoint, calib_files, tmp_path, "method=freq", "ratio=0.25", "save=false"),
                tmp_path / "run2")
    assert "baseline_eval" not in again["timings"] and again["baseline"] == saved["baseline"]
    assert not (tmp_path / "run2" / "checkpoint").exists() and again["experts_after"] == 6


def _suite_se(scores, kind):
    errors = [scores["tasks"][t]["stderr"] for t in scores[f"{kind}_tasks"]]
    return sum(e * e for e in errors) ** 0.5 / len(errors)


def test_metrics_carry_stderrs_and_lm_eval_files(tiny_checkpoint, calib_files, tmp_path):
    """metrics.json: a stderr beside every task score (the compressed model's and the baseline's),
    MC/GEN stderrs by the suite formula; lm-eval's files in <run>/lm_eval/; an old baseline cache
    without stderrs is evaluated again, not used."""
    out = tmp_path / "run"
    cfg = lambda *extra: _cfg(tiny_checkpoint, calib_files, tmp_path, "method=freq", "save=false", "logger=none",
                              "eval.limit=6", *extra)
    saved = run(cfg("eval.log_samples=true"), out)
    for scores in (saved["eval"], saved["baseline"]):
        assert all(t["stderr"] > 0 for t in scores["tasks"].values())
        assert scores["mc_stderr"] == pytest.approx(_suite_se(scores, "mc"))
        assert scores["gen_stderr"] == pytest.approx(_suite_se(scores, "gen"))
        assert scores["percent"]["mc_stderr"] == pytest.approx(100 * scores["mc_stderr"], abs=6e-4)
        assert scores["limit"] == 6
    names = sorted(p.name.rsplit("_", 1)[0] for p in (out / "lm_eval").iterdir())
    assert names == ["results_gen", "results_mc", "samples_tiny_gen", "samples_tiny_mc"]
    [cache] = (tmp_path / "cache" / "baseline").glob("*.json")
    assert sorted(p.name.rsplit("_", 1)[0] for p in cache.with_name(cache.stem + "_lm_eval").iterdir()) == names
    # the entry keeps the task versions lm-eval reported, and its record (read from lm-eval's task index
    # before evaluating) names the same versions
    entry = json.loads(cache.read_text())
    assert entry["versions"] == saved["baseline"]["versions"] == saved["eval"]["versions"] == \
        {"tiny_gen": 1.0, "tiny_mc": 1.0}
    assert {f"task {t}": v for t, v in entry["versions"].items()}.items() <= entry["made_by"].items()
    # a cache written before stderrs were recorded: rebuilt (log_samples does not change the key)
    old = json.loads(cache.read_text())
    for task in old["tasks"].values():
        del task["stderr"]
    cache.write_text(json.dumps(old))
    again = run(cfg(), tmp_path / "run2")
    assert "baseline_eval" in again["timings"] and all(t["stderr"] > 0 for t in again["baseline"]["tasks"].values())
    assert again["baseline"]["tasks"] == saved["baseline"]["tasks"]
    assert "stderr" in json.loads(cache.read_text())["tasks"]["tiny_mc"]
    assert sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "run2" / "lm_eval").iterdir()) == names[:2]


def test_documented_cli(tiny_checkpoint, tmp_path):
    out = tmp_path / "cli"
    cmd = [str(Path(sys.executable).parent / "ream-exp"), "model=local", f"model.path={tiny_checkpoint}", "method=reap",
           "ratio=0.5", "eval=none", "logger=none", f"hydra.run.dir={out}", "calib.n=8", "calib.seq_len=32",
           "calib.mix=[0.0,0.3,0.7]", "progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["experts_after"] == 4 and metrics["mix"] == {"general": 0.0, "math": 0.3, "code": 0.7}
    assert (out / "checkpoint" / "model.safetensors").exists()
    # the same command again is a finished run: skipped, results untouched
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert (out / "metrics.json").stat().st_mtime_ns == stamp
    # progress bars and logging do not make a different run
    shown = subprocess.run([*cmd, "progress=true", "logger=wandb"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert shown.returncode == 0 and "skipped" in shown.stdout
    # another config into the same directory is refused and leaves the results alone
    other = subprocess.run([*cmd, "ratio=0.25"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert other.returncode != 0 and "different config" in other.stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_unfinished_attempt_is_kept_aside_and_rerun(tiny_checkpoint, calib_files, tmp_path):
    out = tmp_path / "retry"
    out.mkdir()
    (out / "error.txt").write_text("Traceback: killed")
    (out / "plan.json").write_text("{}")
    cfg = _cfg(tiny_checkpoint, calib_files, tmp_path, "method=freq", "ratio=0.25", "eval.tasks=[]", "logger=none",
               "save=false")
    metrics = run(cfg, out)
    assert metrics["status"] == "done" and not (out / "error.txt").exists()
    (attempt,) = (out / "attempts").iterdir()
    assert (attempt / "error.txt").read_text() == "Traceback: killed" and (attempt / "plan.json").read_text() == "{}"
    assert run(cfg, out) == json.loads((out / "metrics.json").read_text())  # finished: skipped


def test_a_run_loads_its_tokenizer_once(tiny_checkpoint, calib_files, tmp_path, monkeypatch):
    """Calibration, validate's look into the calibration cache, the checkpoint and the evaluation share one
    tokenizer: from_pretrained runs once per run, whether validate needs it (a hub source, tokenised
    already) or not."""
    import datasets
    import transformers

    from ream_exp.calib.cache import cache_path, calibration_key_material, key_of, save_cached

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    common = ("method=freq", "eval.tasks=[]", "logger=none")
    local = _cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.25")
    hub = _cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.5", "calib.sources.math.path=someorg/numbers")
    material = calibration_key_material(hub.calib, transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint)))
    tokens = torch.ones(sum(material["counts"].values()), 32, dtype=torch.long)
    save_cached(cache_path(hub.cache_dir, key_of(material)), key_of(material), material,
                {"input_ids": tokens, "attention_mask": tokens})  # the hub source is never read
    loads, real = [], transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append(str(a[0])) or real(*a, **k))
    for cfg, name in ((local, "local"), (hub, "hub")):
        loads.clear()
        assert run(cfg, tmp_path / name)["status"] == "done"
        assert loads == [str(tiny_checkpoint)], name
        assert (tmp_path / name / "checkpoint" / "tokenizer_config.json").exists()


def test_pruning_statistics_are_shared_across_ratios(tiny_checkpoint, calib_files, tmp_path, monkeypatch):
    import ream_exp.methods.base as base

    common = ("method=reap", "eval.tasks=[]", "logger=none", "save=false")
    first = run(_cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.25"), tmp_path / "a")
    (entry,) = (tmp_path / "cache" / "stats").glob("*.pt")
    monkeypatch.setattr(base, "observe", lambda *a, **k: pytest.fail("observed again despite the cache"))
    second = run(_cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.5"), tmp_path / "b")
    plans = [Plan.load(tmp_path / d / "plan.json") for d in ("a", "b")]
    assert [l.saliency for l in plans[0].layers] == [l.saliency for l in plans[1].layers]
    assert (first["experts_after"], second["experts_after"]) == (6, 4)
    # a damaged cache entry is not trusted: it is rebuilt
    entry.write_bytes(b"garbage")
    monkeypatch.setattr(base, "observe", __import__("ream_exp.observe", fromlist=["observe"]).observe)
    with pytest.warns(UserWarning, match="unreadable statistics cache"):
        run(_cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.5"), tmp_path / "c")
    assert Plan.load(tmp_path / "c" / "plan.json").layers[0].saliency == plans[0].layers[0].saliency


@pytest.mark.parametrize("method", ["hc_smoe", "ream_nonseq"])
def test_non_sequential_observations_are_shared_across_ratios(method, tiny_checkpoint, calib_files, tmp_path,
                                                               monkeypatch):
    import ream_exp.methods.layerwise as layerwise

    common = (f"method={method}", "eval.tasks=[]", "logger=none", "save=false")
    if method == "ream_nonseq":
        common += ("method.group_size=4",)
    fresh = run(_cfg(tiny_checkpoint, calib_files, tmp_path / "fresh", *common, "ratio=0.5"), tmp_path / "fresh")
    run(_cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.25"), tmp_path / "a")
    assert list((tmp_path / "cache" / "stats").glob("*-layers-*.pt"))
    monkeypatch.setattr(layerwise, "observe_layer", lambda *a, **k: pytest.fail("observed again despite the cache"))
    cached = run(_cfg(tiny_checkpoint, calib_files, tmp_path, *common, "ratio=0.5"), tmp_path / "b")
    assert cached["experts_after"] == fresh["experts_after"] == 4
    want, got = (json.loads((tmp_path / d / "plan.json").read_text())["layers"] for d in ("fresh", "b"))
    for w, g in zip(want, got):
        assert (w["keep"], w["groups"]) == (g["keep"], g["groups"])
        for ww, gw in zip(w["merge_weights"], g["merge_weights"]):
            assert ww == pytest.approx(gw)


def test_pretokenized_calibration_through_the_pipeline(tiny_checkpoint, tmp_path):
    from tests.test_config import make_cfg as compose_cfg

    ids, mask = tiny_batch(batch=6, seq=20, seed=5)
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "calib.pt")
    cfg = compose_cfg("model=local", f"model.path={tiny_checkpoint}", "method=reap", "ratio=0.5", "eval=none",
                      "logger=none", "save=false", "calib=pretokenized", f"calib.path={tmp_path / 'calib.pt'}",
                      f"cache_dir={tmp_path / 'cache'}", "progress=false")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["calib_tokens"] == int(mask.sum()) and metrics["mix"] is None and metrics["experts_after"] == 4


def test_vllm_evaluates_the_uncompressed_baseline_from_model_path(tmp_path, monkeypatch):
    """vLLM loads the model itself: the uncompressed model's checkpoint is model.path."""
    import ream_exp.baseline as baseline_module
    from ream_exp.timing import Timings

    seen = []
    monkeypatch.setattr(baseline_module, "evaluate", lambda model, tok, cfg, checkpoint_dir=None, output_dir=None:
                        seen.append(checkpoint_dir) or {"tasks": {}})
    cfg = make_cfg("model=local", f"model.path={tmp_path}", "method=reap", "eval=gen", "eval.backend=vllm",
                   f"cache_dir={tmp_path / 'cache'}")
    baseline_module.cached_baseline(None, None, cfg, Timings())
    assert seen == [tmp_path]


def test_calibration_is_built_before_the_model_loads(tiny_checkpoint, calib_files, tmp_path, monkeypatch):
    """Cheap steps first: a calibration source that cannot give its sequences fails with the tokenizer
    alone; neither the model nor the baseline evaluation ever starts."""
    import ream_exp.baseline as baseline_module
    import ream_exp.run as run_module

    started = []
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: started.append("load"))
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: started.append("evaluate"))
    monkeypatch.setattr(baseline_module, "evaluate", lambda *a, **k: started.append("baseline"))
    cfg = _cfg(tiny_checkpoint, calib_files, tmp_path, "method=reap", "calib.n=4096", "calib.seq_len=512")
    with pytest.raises(Exception) as failure:
        run(cfg, tmp_path / "run")
    assert started == [], failure.value
    assert "calib" in str(failure.value)


@pytest.mark.parametrize("change", ["EVAL_VERSION", "lm-eval", "task version", "no record"])
def test_a_baseline_made_otherwise_is_evaluated_again(change, tmp_path, monkeypatch, caplog):
    """The cached scores of the uncompressed model record what made them (evaluation/scores.py's EVAL_VERSION,
    lm-eval's version, each task's declared version) and keep the versions lm-eval reported; scores made
    otherwise, or that do not say, are evaluated again and overwritten, with one log line saying why."""
    import logging
    import shutil

    import ream_exp
    import ream_exp.baseline as baseline_module
    from ream_exp.evaluation import scores as eval_scores, task_index
    from ream_exp.timing import Timings

    tasks = tmp_path / "tasks"
    shutil.copytree(TINY_TASKS, tasks)
    (tmp_path / "model").mkdir()
    evaluated = []
    scores = {"tasks": {"tiny_mc": {"score": 0.5, "stderr": 0.1, "kind": "mc"}}, "versions": {"tiny_mc": 1.0}}
    monkeypatch.setattr(baseline_module, "evaluate",
                        lambda *a, **k: evaluated.append(1) or json.loads(json.dumps(scores)))
    cfg = make_cfg("model=local", f"model.path={tmp_path / 'model'}", "method=reap", "eval=mc", "eval.tasks=[tiny_mc]",
                   f"eval.include_path={tasks}", f"cache_dir={tmp_path / 'cache'}")
    baseline = lambda: baseline_module.cached_baseline(None, None, cfg, Timings())  # noqa: E731
    assert baseline() == scores
    [path] = (tmp_path / "cache" / "baseline").glob("*.json")
    entry = json.loads(path.read_text())
    assert entry["made_by"] == {"cache format": 1, "ream-exp": ream_exp.__version__,
                                "evaluate code": eval_scores.EVAL_VERSION,
                                "lm-eval": eval_scores.lm_eval_version(), "task tiny_mc": 1.0}
    assert entry["versions"] == {"tiny_mc": 1.0}  # the versions lm-eval reports, kept in the entry
    caplog.set_level(logging.INFO, logger="ream_exp")
    assert baseline() == scores and evaluated == [1], "unchanged: the cached scores are used"
    assert "baseline cache" not in caplog.text

    if change == "EVAL_VERSION":
        monkeypatch.setattr(eval_scores, "EVAL_VERSION", eval_scores.EVAL_VERSION + 1)
        why = f"evaluate code v{eval_scores.EVAL_VERSION - 1}, this is v{eval_scores.EVAL_VERSION}"
    elif change == "lm-eval":
        monkeypatch.setattr(eval_scores, "lm_eval_version", lambda: "9.9.9")
        why = f"lm-eval {entry['made_by']['lm-eval']}, this is 9.9.9"
    elif change == "task version":
        yaml = tasks / "tiny_mc.yaml"
        yaml.write_text(yaml.read_text().replace("version: 1.0", "version: 2.0"))
        task_index.task_manager.cache_clear()  # the task index is read once per process
        why = "task tiny_mc v1.0, this is v2.0"
    else:  # an entry from before entries recorded what made them
        path.write_text(json.dumps({k: v for k, v in entry.items() if k != "made_by"}))
        why = f"an unknown version (no record of what made it), this is evaluate code v{eval_scores.EVAL_VERSION}"
    assert baseline() == scores and evaluated == [1, 1], "scores made otherwise were used"
    assert [r.getMessage() for r in caplog.records if "baseline cache" in r.getMessage()] == [
        f"baseline cache {path} was made by {why}: recomputing"]
    assert json.loads(path.read_text())["made_by"] == eval_scores.scores_made_by(cfg.eval)  # rewritten, new record
    assert baseline() == scores and evaluated == [1, 1]
