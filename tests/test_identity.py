"""One run identity (ream_exp/identity.py): what a result depends on is in it, what it does not is not.

A setting is left out of the identity only where a run shows it leaves the plan, the weights and the scores
unchanged (test_identity_free_settings_leave_plan_weights_and_scores_unchanged); a finished sweep relaunched
from another clone, with another cache_dir and another device map, skips every run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ream_exp import PACKAGE_DIR
from ream_exp import identity
from ream_exp.identity import NOT_IDENTITY, baseline_key, override_dirname_excluded, run_identity
from ream_exp.run import run
from tests.test_config import make_cfg
from tests.test_stream import _overrides, _source

# Settings outside the identity, each with a value other than the default, as a user would type them.
IDENTITY_FREE = ["progress=false", "logger=none", "cache_dir=/elsewhere/cache", "device=cpu",
                 "model.device_map=cpu", "++model.max_memory={cpu: 8GiB}", "++model.offload_folder=/scratch/offload",
                 "model.stream=true", "calib.states_device=disk", "calib.states_dir=/scratch/states",
                 "method.align_cache_mb=0"]


def test_every_identity_free_setting_is_listed_and_leaves_the_identity():
    listed = {f"{g}.{k}" if g else k for g, keys in NOT_IDENTITY.items() for k in keys} - {"run_dir"}
    assert listed == {o.split("=")[0].lstrip("+") for o in IDENTITY_FREE}
    plain = run_identity(make_cfg())
    for override in IDENTITY_FREE:
        assert run_identity(make_cfg(override)) == plain, override
    assert run_identity(make_cfg(*IDENTITY_FREE)) == plain


@pytest.mark.parametrize("override", ["ratio=0.5", "seed=1", "method=reap", "method.group_size=8", "calib.n=64",
                                      "calib.seed=1", "calib.mix=[0.2,0.4,0.4]", "eval.limit=3", "model.dtype=bfloat16",
                                      "eval.log_samples=true", "save=false", "baseline=false"])
def test_what_a_result_depends_on_changes_the_identity(override):
    assert run_identity(make_cfg(override)) != run_identity(make_cfg())


def test_sweep_run_directories_are_named_without_identity_free_settings():
    excluded = set(override_dirname_excluded())
    assert {o.split("=")[0].lstrip("+") for o in IDENTITY_FREE} <= excluded
    assert {"hydra.run.dir", "hydra.sweep.dir"} <= excluded and "ratio" not in excluded
    composed = OmegaConf.load(PACKAGE_DIR.parent / "conf" / "config.yaml")
    assert list(composed.hydra.job.config.override_dirname.exclude_keys) == override_dirname_excluded()


def test_package_files_count_by_relative_path_and_content(tmp_path, monkeypatch):
    """Two clones at other places with the same files are one identity; a changed file is another."""
    clones = []
    for name in ("clone-a", "clone-b"):
        package = tmp_path / name / "ream_exp"
        (package / "toy" / "data").mkdir(parents=True)
        (package / "toy" / "data" / "calib.jsonl").write_text('{"text": "one"}\n')
        clones.append(package)

    def identity_in(package):
        monkeypatch.setattr(identity, "PACKAGE_DIR", package)
        return run_identity({"calib": {"sources": {"general": {"path": str(package / "toy/data/calib.jsonl")}},
                                       "mix": {"general": 1.0}}})

    first, second = identity_in(clones[0]), identity_in(clones[1])
    assert first == second
    assert first["calib"]["sources"]["general"]["path"]["package_file"] == "toy/data/calib.jsonl"
    (clones[1] / "toy" / "data" / "calib.jsonl").write_text('{"text": "two"}\n')
    assert identity_in(clones[1]) != first


def test_weights_count_by_content_wherever_they_lie(tmp_path, monkeypatch):
    """A copied model directory is the same model; one tensor changed (same shapes, same size) is another;
    large files are digested from samples, which still see a change anywhere in a block they read."""
    source = _source(tmp_path, "qwen3_moe")
    copy = shutil.copytree(source, tmp_path / "copy", copy_function=shutil.copy)  # new place, new mtimes
    key = lambda path: baseline_key(make_cfg("model=local", f"model.path={path}").model, make_cfg().eval)
    assert key(copy) == key(source)
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in weights if "experts" in k)
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert (copy / "model.safetensors").stat().st_size == (source / "model.safetensors").stat().st_size
    assert key(copy) != key(source)
    monkeypatch.setattr(identity, "FULL_DIGEST_BYTES", 1024)  # every file "large": the sampled digest
    monkeypatch.setattr(identity, "BLOCK", 256)
    identity._file_digest.cache_clear()
    assert key(shutil.copytree(source, tmp_path / "copy2", copy_function=shutil.copy)) == key(source)
    head = bytearray((source / "model.safetensors").read_bytes())
    head[-1] ^= 1  # the last block is always read
    (tmp_path / "copy2" / "model.safetensors").write_bytes(bytes(head))
    assert key(tmp_path / "copy2") != key(source)
    identity._file_digest.cache_clear()


def _plan(run_dir: Path) -> dict:
    """plan.json without the time each step took."""
    plan = json.loads((run_dir / "plan.json").read_text())
    plan["info"].pop("timings", None)
    return plan


def _tensors(checkpoint: Path) -> dict:
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_identity_free_settings_leave_plan_weights_and_scores_unchanged(calib_files, tmp_path):
    """The same run in memory, placed through a device map with memory limits, and streamed with its hidden
    states on disk, each with its own cache (nothing shared): one plan, one set of weights, one score."""
    from tests.test_run import TINY_TASKS

    source = _source(tmp_path, "qwen3_moe")
    evaluation = ["eval=mc", "eval.name=tiny", "eval.tasks=[tiny_mc]", f"eval.include_path={TINY_TASKS}",
                  "eval.batch_size=4"]
    variants = {"memory": [], "placed": ["model.device_map=cpu", "++model.max_memory={cpu: 8GiB}", "device=cpu",
                                         "progress=true", "method.align_cache_mb=0"],
                "streamed": ["model.stream=true", "calib.states_device=disk",
                             f"calib.states_dir={tmp_path / 'states'}"]}
    results = {}
    for name, extra in variants.items():
        cfg = make_cfg(*_overrides(source, calib_files, tmp_path / f"cache-{name}", "ream_official", *evaluation,
                                   *extra))
        results[name] = (run(cfg, tmp_path / name), run_identity(cfg))
    memory, memory_identity = results["memory"]
    for name in ("placed", "streamed"):
        metrics, ident = results[name]
        assert ident == memory_identity
        assert _plan(tmp_path / name) == _plan(tmp_path / "memory"), name
        ours, theirs = _tensors(tmp_path / name / "checkpoint"), _tensors(tmp_path / "memory" / "checkpoint")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert metrics["eval"]["tasks"] == memory["eval"]["tasks"], name


def _clone(tmp_path: Path) -> Path:
    """The project's files copied to another place (new paths, new modification times)."""
    root, clone = PACKAGE_DIR.parent, tmp_path / "second clone"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for part in ("ream_exp", "conf", "hydra_plugins", "sweeps"):
        shutil.copytree(root / part, clone / part, ignore=ignore, copy_function=shutil.copy)
    return clone


def _sweep(cwd: Path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, "-m", "ream_exp.cli", "-m", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_finished_sweep_relaunched_from_another_clone_skips_every_run(tmp_path):
    """The toy sweep, relaunched from a copy of the project at another path, with another cache_dir and the
    model placed by a device map: every run is found finished, nothing is computed or cached again."""
    common = ["method=freq", "ratio=0.25,0.5", "eval=none", "save=false", "calib.n=8", "calib.seq_len=32",
              "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = _sweep(PACKAGE_DIR.parent, *common, "logger=none", f"cache_dir={tmp_path / 'cache'}")
    assert first.returncode == 0 and "2 done, 0 skipped, 0 failed" in first.stdout, first.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    clone = _clone(tmp_path)
    where = subprocess.run([sys.executable, "-c", "import ream_exp; print(ream_exp.__file__)"], cwd=clone,
                           env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True, text=True)
    assert Path(where.stdout.strip()).is_relative_to(clone)  # the relaunch runs the clone's code
    again = _sweep(clone, *common, "logger=none", f"cache_dir={tmp_path / 'other cache'}", "model.device_map=cpu")
    assert again.returncode == 0 and "0 done, 2 skipped, 0 failed" in again.stdout, again.stderr[-3000:]
    assert again.stdout.count("  mix .4:.3:.3") == 2  # each run's line names its calibration mix
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == runs
    assert not (tmp_path / "other cache").exists()
