"""The mix search (hydra/sweeper=mix_search): its simplex arithmetic against brute force, and the sweeper
through a real Hydra multirun of a stub app (tests/search_stub) that keeps ream-exp's run-directory
contract: trials run, a relaunch continues without recomputing, failures are FAIL, proposals are mixes."""

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from ream_exp import PACKAGE_DIR
from ream_exp.search import (grid_size, grid_units, mix_from_units, mix_override, objectives, round_to_grid,
                             simplex_params, simplex_weights)
FLOAT64_EPS = sys.float_info.epsilon  # the weights are a few float64 operations from exact

STUB = Path(__file__).parent / "search_stub" / "app.py"
REPO = PACKAGE_DIR.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


# ---------------------------------------------------------------- the simplex

def _compositions(units, k):
    """Every way to share `units` whole units among k sources (brute force)."""
    return [c for c in itertools.product(range(units + 1), repeat=k) if sum(c) == units]


@pytest.mark.parametrize("k,units", [(3, 10), (4, 5), (3, 20)])
def test_grid_size_counts_every_composition(k, units):
    assert grid_size(k, units) == len(_compositions(units, k))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rounding_is_the_nearest_grid_mix(k):
    rng = random.Random(k)
    grid = _compositions(10, k)
    for _ in range(200):
        weights = simplex_weights([rng.random() for _ in range(k - 1)])
        assert min(weights) >= 0 and abs(sum(weights) - 1) <= 8 * FLOAT64_EPS
        units = round_to_grid(weights, 10)
        assert sum(units) == 10 and all(abs(u - 10 * w) < 1 for u, w in zip(units, weights))
        best = min(sum(abs(c - 10 * w) for c, w in zip(point, weights)) for point in grid)
        assert sum(abs(u - 10 * w) for u, w in zip(units, weights)) <= best + 64 * FLOAT64_EPS


def test_uniform_numbers_give_uniform_mixes():
    """Under the uniform law on the simplex of 3, P(w_i > t) = (1 - t)^2 for every source i; a midpoint
    grid of 300 x 300 u values estimates it within the grid's own resolution."""
    n = 300
    mids = [(i + 0.5) / n for i in range(n)]
    points = [simplex_weights([a, b]) for a in mids for b in mids]
    for i in range(3):
        for t in (0.2, 0.5, 0.8):
            share = sum(p[i] > t for p in points) / len(points)
            assert abs(share - (1 - t) ** 2) <= 4 / n, (i, t, share)


@pytest.mark.parametrize("k,units", [(3, 10), (4, 5), (3, 20)])
def test_every_grid_mix_can_be_proposed_exactly(k, units):
    for point in _compositions(units, k):
        assert round_to_grid(simplex_weights(simplex_params(point, units)), units) == point


def test_grid_step_and_override():
    assert grid_units(0.1) == 10 and grid_units(0.05) == 20 and grid_units(1) == 1
    for bad in (0, 0.3, 1.5, "x"):
        with pytest.raises(ValueError, match="hydra.sweeper.step"):
            grid_units(bad)
    mix = mix_from_units(["general", "math", "code"], (3, 0, 7), 10)
    assert mix == {"general": 0.3, "math": 0.0, "code": 0.7}
    assert mix_override(mix) == "calib.mix={general:0.3,math:0,code:0.7}"
    assert mix_override({"tool": 1.0, "general": 0.0}) == "calib.mix={tool:1,general:0}"


def test_objectives_need_a_finished_run_with_both_scores():
    assert objectives({"status": "done", "eval": {"mc": 0.5, "gen": 0.25}}) == (0.5, 0.25)
    with pytest.raises(ValueError, match="no finished metrics"):
        objectives(None)
    with pytest.raises(ValueError, match="no GEN score"):
        objectives({"status": "done", "eval": {"mc": 0.5, "gen": None}})


# ---------------------------------------------------------------- the sweeper, through Hydra

def _search(sweep_dir: Path, *overrides):
    return subprocess.run([sys.executable, str(STUB), "-m", f"hydra.sweep.dir={sweep_dir}", *overrides],
                          capture_output=True, text=True, env=ENV, cwd=sweep_dir.parent, timeout=600)


def _launches(sweep_dir: Path) -> list:
    path = sweep_dir / "launches.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _study(sweep_dir: Path):
    (name,) = optuna.get_all_study_names(f"sqlite:///{sweep_dir / 'study.db'}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _states(study) -> list:
    return [t.state for t in study.get_trials()]


def test_search_runs_trials_and_relaunches_continue_without_recomputing(tmp_path):
    sweep = tmp_path / "sweep"
    first = _search(sweep, "hydra.sweeper.n_trials=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (sweep / "study.db").is_file()  # the study lives in the sweep directory
    runs = _launches(sweep)
    assert len(runs) == 4
    study = _study(sweep)
    assert _states(study) == [optuna.trial.TrialState.COMPLETE] * 4
    for mix, trial in zip(runs, study.get_trials()):  # a valid mix over the declared sources
        assert set(mix) == {"general", "math", "code"}
        assert all(w >= 0 and abs(w * 10 - round(w * 10)) <= 1e-9 for w in mix.values())
        assert abs(sum(mix.values()) - 1) <= 1e-9
        metrics = json.loads((sweep / ("calib.mix={" + ",".join(f"{s}:{w:g}" for s, w in mix.items()) + "}")
                              / "metrics.json").read_text())
        assert list(trial.values) == [metrics["eval"]["mc"], metrics["eval"]["gen"]]  # the run's scores
    assert len({json.dumps(m) for m in runs}) == 4  # four different mixes

    again = _search(sweep, "hydra.sweeper.n_trials=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_launches(sweep)) == 4 and len(_study(sweep).get_trials()) == 4  # nothing new
    values = [t.values for t in _study(sweep).get_trials()]

    more = _search(sweep, "hydra.sweeper.n_trials=6")
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(_launches(sweep)) == 6  # only the two missing mixes ran
    study = _study(sweep)
    finished = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
                and "duplicate_of" not in t.user_attrs]
    assert len({t.user_attrs["mix"] for t in finished}) == 6
    assert [t.values for t in study.get_trials()[:4]] == values  # earlier results kept
    summary = json.loads((sweep / "search.json").read_text())
    assert len(summary["trials"]) == len(study.get_trials()) and summary["pareto_front"]


def test_finished_run_dirs_are_reused_when_the_study_is_gone(tmp_path):
    sweep = tmp_path / "sweep"
    initial = "hydra.sweeper.initial=[{general:1},{math:0.5,code:0.5}]"
    first = _search(sweep, "hydra.sweeper.n_trials=2", initial)
    assert first.returncode == 0, first.stderr[-3000:]
    assert _launches(sweep) == [{"general": 1, "math": 0, "code": 0}, {"general": 0, "math": 0.5, "code": 0.5}]
    values = [t.values for t in _study(sweep).get_trials()]
    (sweep / "study.db").unlink()
    again = _search(sweep, "hydra.sweeper.n_trials=2", initial)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(_launches(sweep)) == 2  # no job launched: both run directories held finished results
    study = _study(sweep)
    assert [t.values for t in study.get_trials()] == values
    assert all(t.user_attrs.get("reused_run_dir") for t in study.get_trials())


@pytest.mark.parametrize("mode", ["raise", "none"])
def test_a_failed_run_is_a_failed_trial_and_a_relaunch_fills_its_place(tmp_path, mode):
    sweep = tmp_path / "sweep"
    args = ["hydra.sweeper.n_trials=3", "hydra.sweeper.initial=[{general:1}]", "fail_general_at_least=1",
            f"fail_mode={mode}"]
    first = _search(sweep, *args)
    assert first.returncode == 1, first.stderr[-3000:]  # the sweep summary: a run failed
    study = _study(sweep)
    states = _states(study)
    assert states[0] == optuna.trial.TrialState.FAIL and study.get_trials()[0].params == {"u0": 1.0, "u1": 0.0}
    assert states[1:] == [optuna.trial.TrialState.COMPLETE] * 2  # the search went on after the failure
    assert len(_launches(sweep)) == 3
    again = _search(sweep, *args)
    study = _study(sweep)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({t.user_attrs["mix"] for t in complete}) == 3 and len(_launches(sweep)) == 4
    assert again.returncode == 0 or _states(study)[-1] == optuna.trial.TrialState.FAIL


def test_searched_sources_are_a_setting(tmp_path):
    sweep = tmp_path / "sweep"
    done = _search(sweep, "hydra.sweeper.n_trials=3", "hydra.sweeper.sources=[general,code]")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _launches(sweep)
    assert len(runs) == 3 and all(mix["math"] == 0 for mix in runs)
    assert all(abs(mix["general"] + mix["code"] - 1) <= 1e-9 for mix in runs)
    (name,) = optuna.get_all_study_names(f"sqlite:///{sweep / 'study.db'}")
    same_name = _search(sweep, "hydra.sweeper.n_trials=3", f"hydra.sweeper.study_name={name}")
    assert same_name.returncode == 1 and "keep hydra.sweeper.sources and step" in same_name.stderr
    other = _search(sweep, "hydra.sweeper.n_trials=1")  # other sources: another study beside the first
    assert other.returncode == 0, other.stderr[-3000:]
    assert len(optuna.get_all_study_names(f"sqlite:///{sweep / 'study.db'}")) == 2 and len(_launches(sweep)) == 4


@pytest.mark.parametrize("override,message", [
    ("calib.mix=[1,0,0]", "calib.mix is what hydra/sweeper=mix_search chooses"),
    ("ratio=0.25,0.5", "sweeps another setting"),
    ("hydra.sweeper.sources=[general,tool]", "declared in calib.sources"),
    ("hydra.sweeper.n_trials=67", "more than the 66 mixes"),
    ("hydra.sweeper.step=0.3", "hydra.sweeper.step=0.3"),
    ("hydra.sweeper.initial=[{web:1}]", "hydra.sweeper.initial[0]"),
])
def test_bad_search_settings_are_refused_before_any_run(tmp_path, override, message):
    sweep = tmp_path / "sweep"
    done = _search(sweep, override)
    assert done.returncode == 1 and message in done.stderr, done.stderr[-3000:]
    assert _launches(sweep) == []


@pytest.mark.slow  # two real toy runs, then a relaunch that runs none
def test_toy_search_runs_real_trials_and_resumes(tmp_path):
    sweep = tmp_path / "toy_search"
    args = [sys.executable, "-m", "ream_exp.cli", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name",
            "toy_search", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", "eval.limit=4", "calib.n=32",
            "method=freq", "progress=false"]
    env = {**ENV, "REAM_EXP_CACHE": str(tmp_path / "cache")}  # (a cache_dir override would name the run dirs)
    first = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep summary: 2 done, 0 skipped, 0 failed" in first.stdout
    study = _study(sweep)
    assert _states(study) == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.get_trials():
        run_dir = next(d for d in sweep.iterdir() if (d / "metrics.json").exists()
                       and json.loads((d / "metrics.json").read_text())["eval"]["mc"] == trial.values[0]
                       and json.loads((d / "metrics.json").read_text())["eval"]["gen"] == trial.values[1])
        assert run_dir.name.startswith("calib.mix={") and "tool:" in run_dir.name  # the toy's 4 sources
    stamps = sorted((d / "metrics.json").stat().st_mtime_ns for d in sweep.iterdir() if (d / "metrics.json").exists())
    again = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 mixes finished, 0 to run" in again.stdout + again.stderr
    assert sorted((d / "metrics.json").stat().st_mtime_ns for d in sweep.iterdir()
                  if (d / "metrics.json").exists()) == stamps
