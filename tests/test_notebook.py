"""The analysis notebook runs top to bottom on any sweep directory: given by REAM_EXP_RUNS, by default
outputs/sweeps/toy_pareto under the working directory, or through `python -m analysis.notebook`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_analysis import write_full_run, write_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "analysis" / "notebooks" / "toy_pareto.ipynb"


def make_sweep(runs: Path) -> Path:
    for i, (method, mix, scores) in enumerate([
        ("reap", (1, 0, 0), (0.8, 0.3)), ("reap", (0, 0.5, 0.5), (0.6, 0.7)),
        ("ream", (1, 0, 0), (0.82, 0.35)), ("ream", (0, 0.5, 0.5), (0.62, 0.72)),
    ]):
        write_full_run(runs / str(i), method, mix, *scores, experts=24)
    write_run(runs / "4", "freq", (1, 0, 0), status="failed", error="RuntimeError: boom")
    return runs


def outputs_text(nb) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))


def execute(nb, cwd: Path):
    nbclient = pytest.importorskip("nbclient")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_notebook_runs_on_the_sweep_named_by_the_environment(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    runs = make_sweep(tmp_path / "sweep")
    monkeypatch.setenv("REAM_EXP_RUNS", str(runs))
    monkeypatch.setenv("REAM_EXP_REF", "50,20")
    monkeypatch.delenv("REAM_EXP_REPORT", raising=False)
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert (runs / "report" / "frontiers.png").exists() and (runs / "report" / "frontiers.pdf").exists()
    text = outputs_text(nb)
    assert "5 runs" in text and "hypervolume" in text and "±" in text
    assert "fixed at (MC, GEN) = (50, 20)" in text


def test_notebook_defaults_to_the_toy_sweep_under_the_working_directory(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    for key in ("REAM_EXP_RUNS", "REAM_EXP_REPORT", "REAM_EXP_REF"):
        monkeypatch.delenv(key, raising=False)
    runs = make_sweep(tmp_path / "outputs" / "sweeps" / "toy_pareto")
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert (runs / "report" / "frontiers.png").exists()
    assert "1 below the smallest MC and GEN" in outputs_text(nb)


def test_notebook_command_runs_on_any_sweep_directory(tmp_path):
    pytest.importorskip("nbclient")
    runs = make_sweep(tmp_path / "elsewhere" / "my_sweep")
    out = tmp_path / "figures"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("REAM_EXP_RUNS", "REAM_EXP_REPORT", "REAM_EXP_REF"):
        env.pop(key, None)
    work = tmp_path / "work"
    work.mkdir()  # neither the checkout nor the sweep: relative paths resolve here
    done = subprocess.run([sys.executable, "-m", "analysis.notebook", "../elsewhere/my_sweep", "--out", str(out)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "frontiers.png").exists() and (out / "toy_pareto.ipynb").exists()
    assert not (runs / "report").exists()
    assert "5 runs in " + str(runs) in (out / "toy_pareto.ipynb").read_text()
    missing = subprocess.run([sys.executable, "-m", "analysis.notebook", str(tmp_path / "nope")], cwd=work, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no such sweep directory" in missing.stderr
