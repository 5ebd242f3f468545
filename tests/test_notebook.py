"""The analysis notebook runs top to bottom on a folder of run directories."""

import os
from pathlib import Path

import pytest

from tests.test_analysis import write_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis" / "notebooks" / "toy_pareto.ipynb"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    runs = tmp_path / "sweep"
    for i, (method, mix, scores) in enumerate([
        ("reap", (1, 0, 0), (0.8, 0.3)), ("reap", (0, 0.5, 0.5), (0.6, 0.7)),
        ("ream", (1, 0, 0), (0.82, 0.35)), ("ream", (0, 0.5, 0.5), (0.62, 0.72)),
    ]):
        write_run(runs / str(i), method, mix, experts=24, scores=scores)
    write_run(runs / "4", "freq", (1, 0, 0), status="failed", error="RuntimeError: boom")
    monkeypatch.setenv("REAM_EXP_RUNS", str(runs))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (runs / "report" / "frontiers.png").exists() and (runs / "report" / "frontiers.pdf").exists()
    text = "".join(o.get("text", "") + str(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))
    assert "5 runs" in text and "hypervolume" in text
