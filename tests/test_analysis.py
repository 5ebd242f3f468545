"""Tests of analysis/: run collection, Pareto frontiers + hypervolume, plots, tables, report.

The paper's per-mix table (docs/algorithms.md, expected numbers) lives in tests/data/paper_table.csv;
hypervolumes are checked against brute-force computations written here independently of analysis.pareto.
Run:  pytest tests/test_analysis.py
"""

import csv
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import tables
from analysis.collect import collect_runs
from analysis.wandb_runs import collect_wandb, wandb_row
from analysis.naming import format_mix, parse_mix
from analysis.pareto import EvalMismatch, SettingsMismatch, frontiers, hypervolume, pareto_front, read_points_csv
from analysis.plots import plot_frontiers
from analysis.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
PAPER_CSV = ROOT / "tests" / "data" / "paper_table.csv"
PAPER_MIXES = [".3:.3:.3", ".5:.5:0", ".5:0:.5", "0:.5:.5", ".2:.5:.3",
               ".1:.8:.1", "0:.7:.3", ".2:.25:.55", ".1:.1:.8", "0:.3:.7"]


# ---------------------------------------------------------------- independent references

def dominates(p, q):
    return p[0] >= q[0] and p[1] >= q[1] and (p[0] > q[0] or p[1] > q[1])


def grid_hypervolume_tenths(points, ref):
    """Area dominated above ref by counting 0.1 x 0.1 cells; exact for values printed to one decimal."""
    pts = np.array([[round(x * 10), round(y * 10)] for x, y in points])
    rx, ry = round(ref[0] * 10), round(ref[1] * 10)
    xs = np.arange(rx, pts[:, 0].max())  # lower-left corners of the cells
    ys = np.arange(ry, pts[:, 1].max())
    covered = np.zeros((len(xs), len(ys)), dtype=bool)
    for px, py in pts:  # cell [x, x+1] x [y, y+1] lies in box [ref, p] iff x + 1 <= px and y + 1 <= py
        covered |= (xs[:, None] + 1 <= px) & (ys[None, :] + 1 <= py)
    return covered.sum() * 0.01


def inclusion_exclusion_area(points, ref):
    """Area of the union of boxes [ref, p] by inclusion-exclusion over all non-empty subsets."""
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            width = max(0.0, min(p[0] for p in subset) - ref[0])
            height = max(0.0, min(p[1] for p in subset) - ref[1])
            total += (-1) ** (size + 1) * width * height
    return total


def paper_rows():
    with open(PAPER_CSV, newline="") as handle:
        return [dict(r, experts=int(r["experts"]), mc=float(r["mc"]), gen=float(r["gen"]))
                for r in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def paper():
    return read_points_csv(PAPER_CSV)


# ---------------------------------------------------------------- the paper table

def test_paper_csv_is_the_full_table():
    rows = paper_rows()
    assert len(rows) == 80
    combos = {(r["method"], r["experts"], r["mix"]) for r in rows}
    assert combos == set(itertools.product(["freq", "reap", "hc_smoe", "ream"], [96, 64], PAPER_MIXES))


def test_pareto_cli_on_paper_table_matches_brute_force():
    result = subprocess.run([sys.executable, "-m", "analysis.pareto", "--csv", str(PAPER_CSV)],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    reported = {(r["method"], r["experts"]): r for r in json.loads(result.stdout)}
    rows = paper_rows()
    assert len(reported) == 8
    for experts in (96, 64):
        at_count = [r for r in rows if r["experts"] == experts]
        ref = (min(r["mc"] for r in at_count) - 1, min(r["gen"] for r in at_count) - 1)
        for method in ("freq", "reap", "hc_smoe", "ream"):
            mine = [r for r in at_count if r["method"] == method]
            points = [(r["mc"], r["gen"]) for r in mine]
            front = {r["mix"] for r in mine if not any(dominates(q, (r["mc"], r["gen"])) for q in points)}
            entry = reported[(method, experts)]
            assert entry["reference"] == pytest.approx(ref)
            assert entry["hypervolume"] == pytest.approx(grid_hypervolume_tenths(points, ref), abs=1e-6)
            assert entry["frontier_size"] == len(front)
            assert {f["mix"] for f in entry["frontier"]} == front


def test_paper_frontiers_are_exactly_the_non_dominated_points(paper):
    table = frontiers(paper)
    for row in table.itertuples():
        group = paper[(paper.method == row.method) & (paper.experts == row.experts)]
        points = list(zip(group.mc, group.gen))
        on_front = {f["mix"] for f in row.frontier}
        for mix, p in zip(group.mix, points):
            dominated = any(dominates(q, p) for q in points)
            assert dominated == (mix not in on_front), (row.method, row.experts, mix)


def test_best_gen_mixes_match_the_paper(paper):
    best = tables.best_gen_table(paper)
    at96 = best[best.experts == 96].set_index("method")
    expected = {"Freq": ("0:.3:.7", 67.6), "HC-SMoE": (".5:0:.5", 67.4),
                "REAP": (".2:.25:.55", 68.6), "REAM": ("0:.5:.5", 69.8)}
    for label, (mix, gen) in expected.items():
        assert at96.loc[label, "mix"] == mix
        assert at96.loc[label, "gen"] == pytest.approx(gen)
    assert list(best.experts) == [96] * 4 + [64] * 4


def test_mix_table_reproduces_the_printed_cells(paper):
    table = tables.mix_table(paper)
    assert list(table.columns) == ["mix"] + [f"{m} {e}" for e in (96, 64)
                                             for m in ("Freq", "REAP", "HC-SMoE", "REAM")]
    assert len(table) == 10
    cells = table.set_index("mix")
    labels = {"freq": "Freq", "reap": "REAP", "hc_smoe": "HC-SMoE", "ream": "REAM"}
    for r in paper_rows():  # every printed cell comes back, formatted as printed
        assert cells.loc[r["mix"], f"{labels[r['method']]} {r['experts']}"] == f"{r['mc']:.1f}/{r['gen']:.1f}"
    assert cells.loc[".3:.3:.3", "Freq 96"] == "56.2/60.3" and cells.loc["0:.3:.7", "REAM 64"] == "48.7/58.7"
    assert list(table["mix"]) == [r["mix"] for r in paper_rows()[:10]]  # rows keep the data's order
    markdown, latex = tables.to_markdown(table), tables.to_latex(table)
    assert "| .3:.3:.3" in markdown and "66.3/64.0" in markdown
    assert "\\begin{tabular}" in latex and "HC-SMoE 96" in latex and "69.2/47.7" in latex
    best_latex = tables.to_latex(tables.best_gen_table(paper))
    assert "69.8" in best_latex and "\\begin{tabular}" in best_latex


# ---------------------------------------------------------------- geometry on random data

@pytest.mark.parametrize("seed", range(6))
def test_hypervolume_matches_inclusion_exclusion(seed):
    rng = np.random.default_rng(seed)
    points = [tuple(p) for p in rng.uniform(0, 10, size=(7, 2))]
    points += [points[0], (points[1][0], points[2][1])]  # a duplicate and a shared coordinate
    ref = (2.0, 3.0)  # some points lie below it in one coordinate: they add nothing
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion_area(points, ref), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_is_non_dominated_and_covers_the_rest(seed):
    rng = np.random.default_rng(seed)
    points = [tuple(p) for p in rng.integers(0, 6, size=(25, 2)).astype(float)]  # many ties
    front = list(pareto_front(points))
    for i, p in enumerate(points):
        assert any(dominates(q, p) for q in points) == (i not in front)
    shuffled = rng.permutation(len(points))
    again = [points[shuffled[i]] for i in pareto_front([points[j] for j in shuffled])]
    assert sorted(again) == sorted(points[i] for i in front)
    assert front == list(pareto_front(points))


def test_duplicates_and_edge_cases():
    assert list(pareto_front([(1, 1), (0, 0), (1, 1)])) == [0, 2]
    assert list(pareto_front([(3, 1), (1, 3), (2, 2)])) == [1, 2, 0]  # MC ascending
    assert hypervolume([(1, 1), (1, 1)], (0, 0)) == pytest.approx(1.0)
    assert hypervolume([(5, -1)], (0, 0)) == 0.0
    assert hypervolume([], (0, 0)) == 0.0
    with pytest.raises(ValueError):
        pareto_front([(1, float("nan"))])


def test_mix_strings_follow_the_paper():
    assert format_mix([0, 0.3, 0.7]) == "0:.3:.7"
    assert format_mix((1.0, 0.0, 0.0)) == "1:0:0"
    assert format_mix([0.2, 0.25, 0.55]) == ".2:.25:.55"
    assert format_mix("0.1:0.1:0.8") == ".1:.1:.8" and format_mix([0.3333333, 1.5, 0]) == ".3333:1.5:0"
    assert format_mix({"general": 0.5, "math": 0.5, "code": 0}) == ".5:.5:0"
    for mix in PAPER_MIXES:
        assert format_mix(parse_mix(mix)) == mix


# ---------------------------------------------------------------- run directories

def write_run(path: Path, method, mix, experts=None, scores=None, status="done", error=None):
    path.mkdir(parents=True)
    config = {"model": {"name": "toy-moe"}, "calib": {"mix": list(mix)}, "method": {"name": method},
              "ratio": 0.25, "seed": 0}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    if error is not None:
        (path / "error.txt").write_text("Traceback (most recent call last):\n  ...\n" + error + "\n")
    if scores is None and status == "done":
        return
    mc, gen = scores or (None, None)
    tasks = {"arc_easy": {"score": mc, "metric": "acc", "kind": "mc"},
             "gsm8k": {"score": gen, "metric": "exact_match", "kind": "gen"}} if scores else {}
    metrics = {"status": status, "method": method, "ratio": 0.25, "experts_before": 8,
               "experts_after": experts, "mix": list(mix),
               "eval": {"mc": mc, "gen": gen, "avg": None if mc is None else (mc + gen) / 2,
                        "tasks": tasks}}
    (path / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def run_root(tmp_path):
    root = tmp_path / "outputs"
    sweep = root / "multirun" / "2026-01-01"
    write_run(sweep / "0", "reap", (0, 0.3, 0.7), experts=6, scores=(0.5, 0.6))
    write_run(sweep / "1", "reap", (0.5, 0.5, 0), experts=6, scores=(0.7, 0.4))
    write_run(sweep / "2", "ream", (0, 0.3, 0.7), experts=6, scores=(0.55, 0.65))
    write_run(sweep / "3", "ream", (0.5, 0.5, 0), experts=6, error="RuntimeError: CUDA out of memory")
    write_run(sweep / "4", "freq", (0.2, 0.25, 0.55), experts=6, status="failed",
              error="ValueError: keeping fewer experts than top_k")
    write_run(root / "base", "none", (1, 0, 0), experts=8, scores=(0.8, 0.7))
    (sweep / "0" / ".hydra").mkdir()
    (sweep / "0" / ".hydra" / "config.yaml").write_text("a: 1\n")  # Hydra's copy: not a run
    (root / "notes").mkdir()
    (root / "notes" / "config.yaml").write_text("a: 1\n")  # config without results: not a run
    return root


def test_collect_runs_reads_done_and_failed_runs(run_root):
    runs = collect_runs(run_root).set_index("run_dir")
    assert len(runs) == 6
    done = runs.loc[str(run_root / "multirun" / "2026-01-01" / "0")]
    assert (done.method, done.experts, done.mix, done.status) == ("reap", 6, "0:.3:.7", "done")
    assert (done.mix_general, done.mix_math, done.mix_code) == (0, 0.3, 0.7)
    assert done.mc == pytest.approx(50) and done.gen == pytest.approx(60) and done.avg == pytest.approx(55)
    assert done["task/gsm8k"] == pytest.approx(60) and done["task/arc_easy"] == pytest.approx(50)
    assert done.model == "toy-moe" and done.ratio == 0.25
    oom = runs.loc[str(run_root / "multirun" / "2026-01-01" / "3")]
    assert (oom.status, oom.method, oom.mix) == ("failed", "ream", ".5:.5:0")
    assert "out of memory" in oom.error and math.isnan(oom.mc) and math.isnan(oom.gen)
    flagged = runs.loc[str(run_root / "multirun" / "2026-01-01" / "4")]
    assert flagged.status == "failed" and "top_k" in flagged.error and math.isnan(flagged.avg)
    assert sorted(runs.status) == ["done"] * 4 + ["failed"] * 2


def test_failed_runs_do_not_break_the_analysis(run_root, tmp_path):
    runs = collect_runs(run_root)
    table = frontiers(runs).set_index("method")
    assert set(table.index) == {"reap", "ream"}  # 'none' and the all-failed 'freq' are not compared
    assert table.loc["reap", "frontier_size"] == 2 and table.loc["ream", "n_points"] == 1
    ref = (table.loc["reap", "ref_mc"], table.loc["reap", "ref_gen"])
    assert ref == pytest.approx((49.0, 39.0))
    assert table.loc["ream", "hypervolume"] == pytest.approx(inclusion_exclusion_area([(55, 65)], ref))
    assert tables.mix_table(runs).set_index("mix").loc[".5:.5:0", "REAM 6"] == tables.MISSING
    out = json.loads(subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(run_root)],
                                    cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert {(r["method"], r["experts"]) for r in out} == {("reap", 6), ("ream", 6)}


def test_report_writes_every_artefact(run_root, tmp_path):
    out = tmp_path / "report"
    report_main(["--runs", str(run_root), "--out", str(out)])
    for name in ("runs.csv", "frontiers.json", "frontiers.png", "frontiers.pdf",
                 "best_gen.md", "best_gen.tex", "mix_table.md", "mix_table.tex"):
        assert (out / name).stat().st_size > 0, name
    assert len(pd.read_csv(out / "runs.csv")) == 6


# ---------------------------------------------------------------- plots

def test_plot_frontiers_writes_png_and_pdf(paper, tmp_path):
    with_base = pd.concat([paper, pd.DataFrame([{"method": "none", "experts": 128, "mix": "-",
                                                  "mc": 69.7, "gen": 70.9}])], ignore_index=True)
    paths = plot_frontiers(with_base, tmp_path / "figs" / "paper")
    assert [p.name for p in paths] == ["paper.png", "paper.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_plot_without_finished_runs(tmp_path):
    empty = pd.DataFrame(columns=["method", "experts", "mix", "mc", "gen"])
    paths = plot_frontiers(empty, tmp_path / "empty")
    assert all(p.stat().st_size > 0 for p in paths)


# ---------------------------------------------------------------- Weights & Biases (offline)

class FakeRun:
    def __init__(self, config, summary, state="finished"):
        self.config, self.summary_metrics, self.state = config, summary, state
        self.path = ["me", "ream-exp", "abc123"]


def test_wandb_row_maps_nested_and_flattened_runs():
    nested = FakeRun({"model": {"name": "qwen"}, "calib": {"mix": [0, 0.5, 0.5]},
                      "method": {"name": "ream"}, "seed": 1, "_wandb": {"x": 1}},
                     {"status": "done", "method": "ream", "experts_after": 96, "ratio": 0.25,
                      "eval": {"mc": 0.61, "gen": 0.698, "tasks": {"gsm8k": {"score": 0.9}}},
                      "_runtime": 5})
    row = wandb_row(nested)
    assert (row["method"], row["experts"], row["mix"], row["model"]) == ("ream", 96, "0:.5:.5", "qwen")
    assert row["gen"] == pytest.approx(69.8) and row["avg"] == pytest.approx(65.4)
    assert row["task/gsm8k"] == pytest.approx(90) and row["run_dir"] == "wandb:me/ream-exp/abc123"
    flat = FakeRun({"model.name": {"value": "qwen"}, "calib/mix": [0, 0.5, 0.5], "method.name": "ream"},
                   {"experts_after": 64, "eval/mc": 0.5, "eval/gen": 0.6, "eval/tasks/gsm8k/score": 0.7},
                   state="crashed")
    row = wandb_row(flat)
    assert (row["status"], row["method"], row["experts"], row["model"]) == ("failed", "ream", 64, "qwen")
    assert math.isnan(row.get("mc", math.nan))  # a crashed run's partial scores are not used


def test_collect_wandb_reports_an_unreachable_project(monkeypatch):
    import wandb

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", offline)
    with pytest.raises(RuntimeError, match="could not read the W&B project 'me/proj'"):
        collect_wandb("proj", entity="me")


def test_report_on_a_folder_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    report_main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "report")])
    assert json.loads((tmp_path / "report" / "frontiers.json").read_text()) == []
    assert (tmp_path / "report" / "frontiers.png").stat().st_size > 0


# ---------------------------------------------------------------- task sets

def write_scored_run(path: Path, method, mix, tasks: dict, recorded=True, experts=6):
    """A finished run whose eval holds `tasks` {name: (kind, score)}; the means are over the scored
    tasks of each kind; `recorded` writes mc_tasks / gen_tasks as evaluate() does now."""
    path.mkdir(parents=True)
    config = {"model": {"name": "toy-moe"}, "calib": {"mix": list(mix)}, "method": {"name": method},
              "ratio": 0.25, "seed": 0}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    entries = {name: {"score": score, "metric": "m", "kind": kind} for name, (kind, score) in tasks.items()}
    evaluation = {"tasks": entries}
    for kind in ("mc", "gen"):
        scores = [score for k, score in tasks.values() if k == kind and score is not None]
        evaluation[kind] = sum(scores) / len(scores) if scores else None
        if recorded:
            evaluation[f"{kind}_tasks"] = [name for name, (k, _) in tasks.items() if k == kind]
    metrics = {"status": "done", "method": method, "experts_after": experts, "mix": list(mix), "eval": evaluation}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


MC_TASKS = {"mmlu": ("mc", 0.5), "arc_easy": ("mc", 0.6)}


@pytest.fixture()
def mixed_root(tmp_path):
    """Two REAM points on GEN = {gsm8k, humaneval}, one REAP point on GEN = {gsm8k} alone."""
    root = tmp_path / "mixed"
    write_scored_run(root / "a", "ream", (0, 0.5, 0.5), {**MC_TASKS, "gsm8k": ("gen", 0.6), "humaneval": ("gen", 0.2)})
    write_scored_run(root / "b", "ream", (0.5, 0.5, 0), {**MC_TASKS, "gsm8k": ("gen", 0.5), "humaneval": ("gen", 0.3)})
    write_scored_run(root / "c", "reap", (0, 0.5, 0.5), {**MC_TASKS, "gsm8k": ("gen", 0.6)})
    return root


def test_collect_carries_recorded_and_derived_task_sets(tmp_path):
    new = write_scored_run(tmp_path / "new", "ream", (0, 0.5, 0.5), {**MC_TASKS, "gsm8k": ("gen", 0.6)})
    # an older metrics.json: no recorded sets; its GEN mean left out the task without a score
    old = write_scored_run(tmp_path / "old", "ream", (0.5, 0.5, 0),
                           {**MC_TASKS, "gsm8k": ("gen", 0.6), "ifeval": ("gen", None)}, recorded=False)
    runs = collect_runs(tmp_path).set_index("run_dir")
    assert runs.loc[str(new), "mc_tasks"] == "arc_easy+mmlu" and runs.loc[str(new), "gen_tasks"] == "gsm8k"
    assert runs.loc[str(old), "mc_tasks"] == "arc_easy+mmlu" and runs.loc[str(old), "gen_tasks"] == "gsm8k"
    only_mc = write_scored_run(tmp_path / "more" / "mc", "ream", (0, 0, 1), MC_TASKS)
    assert collect_runs(tmp_path / "more").set_index("run_dir").loc[str(only_mc), "gen_tasks"] == "-"
    # a W&B summary without per-task kinds says nothing about its task sets
    row = wandb_row(FakeRun({"method": {"name": "ream"}}, {"status": "done", "experts_after": 6,
                                                           "eval": {"mc": 0.5, "gen": 0.6, "tasks": {"gsm8k": {"score": 0.6}}}}))
    assert row["mc_tasks"] is None and row["gen_tasks"] is None


def test_frontiers_refuse_different_task_sets_naming_the_runs(mixed_root):
    runs = collect_runs(mixed_root)
    for compare in (frontiers, tables.best_gen_table, tables.mix_table):
        with pytest.raises(EvalMismatch) as caught:
            compare(runs)
        message = str(caught.value)
        assert "(GEN tasks differ)" in message and "\n" not in message
        assert "[GEN tasks: gsm8k+humaneval] 2 run(s)" in message
        assert "[GEN tasks: gsm8k] 1 run(s)" in message
        assert all(str(mixed_root / name) in message for name in "abc")
        assert "--allow-mixed-evals" in message and "allow_mixed_evals=True" in message
    # one task set alone is fine
    same = frontiers(runs[runs["method"] == "ream"])
    assert not same["mixed_evals"].any()
    assert list(same["evals"]) == [["MC tasks: arc_easy+mmlu | GEN tasks: gsm8k+humaneval | limit: ? | few-shot: ? | GEN protocol: ?"]]


def test_mixed_task_sets_can_be_compared_flagged_and_never_averaged(mixed_root, tmp_path):
    runs = collect_runs(mixed_root)
    # a second REAP seed at the same mix but on the REAM task set: kept as its own point
    extra = write_scored_run(tmp_path / "extra" / "d", "reap", (0, 0.5, 0.5),
                             {**MC_TASKS, "gsm8k": ("gen", 0.2), "humaneval": ("gen", 0.2)})
    runs = pd.concat([runs, collect_runs(extra.parent)], ignore_index=True)
    with pytest.warns(UserWarning, match="different eval settings"):
        table = frontiers(runs, allow_mixed_evals=True).set_index("method")
    assert table["mixed_evals"].all()
    assert table.loc["reap", "n_points"] == 2  # not one point averaged over two task sets
    assert len(table.loc["reap", "evals"]) == 2
    with pytest.warns(UserWarning):
        best = tables.best_gen_table(runs, allow_mixed_evals=True)
        mix = tables.mix_table(runs, allow_mixed_evals=True)
    assert "eval_setting" in best.columns and "eval_setting" in mix.columns
    assert len(mix[mix["mix"] == "0:.5:.5"]) == 2  # one row per (mix, task set)


def test_report_refuses_mixed_task_sets_unless_allowed(mixed_root, tmp_path):
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match="error: .*different eval settings"):
        report_main(["--runs", str(mixed_root), "--out", str(out)])
    assert not out.exists()  # refused before anything was written
    with pytest.warns(UserWarning):
        report_main(["--runs", str(mixed_root), "--out", str(out), "--allow-mixed-evals"])
    fronts = json.loads((out / "frontiers.json").read_text())
    assert fronts and all(f["mixed_evals"] for f in fronts)
    assert "eval_setting" in (out / "mix_table.md").read_text()
    refused = subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(mixed_root)],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "different eval settings" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "--allow-mixed-evals" in refused.stderr


def test_tables_without_task_sets_count_as_one_set(paper):
    """The paper CSV and run tables written before task sets were recorded (here the docs' toy sweep table
    without its eval columns) still compare; the docs' table as written records one eval set."""
    docs_runs = read_points_csv(ROOT / "docs" / "toy_pareto" / "runs.csv")
    older = docs_runs.drop(columns=[c for c in docs_runs.columns if c.endswith("_tasks") or c.startswith("eval")
                                    or c in ("gen_protocol", "settings")])
    unknown = "MC tasks: ? | GEN tasks: ? | limit: ? | few-shot: ? | GEN protocol: ?"
    for table, expected in ((paper, unknown), (older, unknown), (docs_runs, None)):
        fronts = frontiers(table)
        assert not fronts["mixed_evals"].any()
        sets = {s for sets in fronts["evals"] for s in sets}
        assert len(sets) == 1 and (sets == {expected} if expected else unknown not in sets)


def test_task_sets_survive_the_runs_csv(mixed_root, tmp_path):
    runs = collect_runs(mixed_root)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    again = read_points_csv(tmp_path / "runs.csv")
    assert list(again["gen_tasks"]) == list(runs["gen_tasks"])
    with pytest.raises(EvalMismatch):
        frontiers(again)


# ---------------------------------------------------------------- standard errors and eval settings

def write_full_run(path: Path, method, mix, mc, gen, se=(0.01, 0.02), limit=50, fewshot=0, experts=6,
                   baseline=(0.8, 0.7, 0.005, 0.006), seed=0, config=None, gen_protocol=None):
    """A run as evaluate() writes it now: one MC and one GEN task with stderrs, eval settings, baseline;
    `config` ({group: {key: value}}) is merged into its config.yaml."""
    path.mkdir(parents=True)
    config = _merged({"model": {"name": "toy-moe"}, "calib": {"mix": list(mix)}, "method": {"name": method},
                      "ratio": 0.25, "seed": seed, "eval": {"name": "toy", "limit": limit}}, config or {})
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    tasks = {"facts": {"score": mc, "stderr": se[0], "kind": "mc", "n": limit or 80, "fewshot": fewshot},
             "arith": {"score": gen, "stderr": se[1], "kind": "gen", "n": limit or 80, "fewshot": fewshot}}
    base = None if baseline is None else {"mc": baseline[0], "gen": baseline[1], "mc_stderr": baseline[2],
                                          "gen_stderr": baseline[3]}
    evaluation = {"tasks": tasks, "mc": mc, "gen": gen, "avg": (mc + gen) / 2, "mc_stderr": se[0],
                  "gen_stderr": se[1], "avg_stderr": math.hypot(*se) / 2, "mc_tasks": ["facts"],
                  "gen_tasks": ["arith"], "limit": limit}
    if gen_protocol is not None:  # {task: protocol}, as evaluate() records it
        evaluation["gen_protocol"] = gen_protocol
    metrics = {"status": "done", "method": method, "experts_before": 8, "experts_after": experts,
               "mix": list(mix), "eval": evaluation, "baseline": base}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture()
def se_root(tmp_path):
    root = tmp_path / "se"
    write_full_run(root / "a", "reap", (0, 0.5, 0.5), 0.61, 0.552, se=(0.008, 0.0112))
    write_full_run(root / "b", "reap", (1, 0, 0), 0.70, 0.40, se=(0.007, 0.013))
    write_full_run(root / "c", "ream", (0, 0.5, 0.5), 0.63, 0.58, se=(0.009, 0.012))
    return root


def test_collect_carries_stderrs_eval_settings_and_baseline(se_root):
    runs = collect_runs(se_root).set_index("run_dir")
    a = runs.loc[str(se_root / "a")]
    assert a.mc_stderr == pytest.approx(0.8) and a.gen_stderr == pytest.approx(1.12)
    assert a.avg_stderr == pytest.approx(100 * math.hypot(0.008, 0.0112) / 2)
    assert a["stderr/facts"] == pytest.approx(0.8) and a["stderr/arith"] == pytest.approx(1.12)
    assert (a["eval"], a.eval_limit, a.eval_fewshot, a.eval_items) == ("toy", "50", "arith=0 facts=0",
                                                                       "arith=50 facts=50")
    assert a.mc_tasks == "facts" and a.experts_before == 8
    assert (a.baseline_mc, a.baseline_gen, a.baseline_mc_stderr) == pytest.approx((80, 70, 0.5))


def test_stderrs_survive_the_runs_csv_and_seeds_average_them(se_root, tmp_path):
    runs = collect_runs(se_root)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    again = read_points_csv(tmp_path / "runs.csv")
    assert list(again["mc_stderr"]) == pytest.approx(list(runs["mc_stderr"]))
    assert list(frontiers(again)["hypervolume"]) == pytest.approx(list(frontiers(runs)["hypervolume"]))
    seed = write_full_run(tmp_path / "seed" / "a2", "reap", (0, 0.5, 0.5), 0.63, 0.56, se=(0.010, 0.0132))
    both = pd.concat([runs, collect_runs(seed.parent)], ignore_index=True)
    best = tables.best_gen_table(both).set_index("method").loc["REAP"]
    assert (best.mix, best.mc, best.gen) == ("0:.5:.5", pytest.approx(62.0), pytest.approx(55.6))
    assert best.mc_stderr == pytest.approx(0.9) and best.gen_stderr == pytest.approx(1.22)  # seed means


def test_tables_print_value_plus_minus_stderr(se_root, paper):
    runs = collect_runs(se_root)
    cells = tables.mix_table(runs).set_index("mix")
    assert cells.loc["0:.5:.5", "REAP 6"] == "61.0 ± 0.8/55.2 ± 1.1"
    assert cells.loc["1:0:0", "REAM 6"] == tables.MISSING
    best = tables.to_markdown(tables.best_gen_table(runs))
    assert "| 63.0 ± 0.9 | 58.0 ± 1.2 |" in best and "stderr" not in best
    assert "61.0 ± 0.8" in tables.to_latex(tables.best_gen_table(runs))
    # without stderrs (the paper's table) the numbers print alone
    plain = tables.to_markdown(tables.best_gen_table(paper))
    assert "±" not in plain and "stderr" not in plain and "69.8" in plain
    assert tables.with_stderr(61.04, 0.849) == "61.0 ± 0.8" and tables.with_stderr(61.04, math.nan) == "61.0"


@pytest.mark.parametrize("field, value, named", [("limit", None, "limit"), ("fewshot", 5, "few-shot")])
def test_runs_with_different_limit_or_fewshot_are_refused(se_root, field, value, named):
    write_full_run(se_root / "d", "ream", (1, 0, 0), 0.7, 0.3, **{field: value})
    runs = collect_runs(se_root)
    for compare in (frontiers, tables.best_gen_table, tables.mix_table,
                    lambda df: plot_frontiers(df, se_root.parent / "fig")):
        with pytest.raises(EvalMismatch) as caught:
            compare(runs)
        message = str(caught.value)
        assert f"({named} differ)" in message and str(se_root / "d") in message and "--allow-mixed-evals" in message
        assert "tasks" not in message.split("differ")[0]  # only what differs is named
    with pytest.warns(UserWarning, match=named):
        table = frontiers(runs, allow_mixed_evals=True).set_index("method")
    assert table.loc["ream", "n_points"] == 2 and len(table.loc["ream", "evals"]) == 2
    if field == "limit":
        assert any("limit: all" in s for s in table.loc["ream", "evals"])


def test_fixed_reference_point_changes_the_hypervolume_as_by_hand(se_root, tmp_path):
    runs = collect_runs(se_root)
    points = {"reap": [(61.0, 55.2), (70.0, 40.0)], "ream": [(63.0, 58.0)]}
    default = frontiers(runs).set_index("method")
    paper_ref = (61.0 - 1, 40.0 - 1)  # one below the smallest MC and GEN of all methods compared
    assert (default.loc["reap", "ref_mc"], default.loc["reap", "ref_gen"]) == pytest.approx(paper_ref)
    for method, pts in points.items():
        assert default.loc[method, "hypervolume"] == pytest.approx(inclusion_exclusion_area(pts, paper_ref))
    # by hand, ref (50, 30): reap = 11 x 25.2 + (70 - 61) x 10 = 367.2; ream = 13 x 28 = 364
    fixed = frontiers(runs, ref=(50, 30)).set_index("method")
    assert fixed.loc["reap", "hypervolume"] == pytest.approx(367.2)
    assert fixed.loc["ream", "hypervolume"] == pytest.approx(364.0)
    assert fixed.loc["reap", "ref_rule"] == "fixed at (MC, GEN) = (50, 30)"
    # the fixed point does not move with the methods compared; the paper's one does
    alone = frontiers(runs[runs["method"] == "ream"], ref=(50, 30))
    assert alone["hypervolume"].iloc[0] == pytest.approx(364.0)
    assert frontiers(runs[runs["method"] == "ream"])["hypervolume"].iloc[0] == pytest.approx(1.0)
    cli = subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(se_root), "--ref", "50,30"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    reported = {r["method"]: r for r in json.loads(cli.stdout)}
    assert reported["reap"]["hypervolume"] == pytest.approx(367.2) and reported["reap"]["reference"] == [50, 30]
    bad = subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(se_root), "--ref", "50"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "MC,GEN" in bad.stderr
    out = tmp_path / "report"
    report_main(["--runs", str(se_root), "--out", str(out), "--ref", "50,30"])
    hv = (out / "hypervolume.md").read_text()
    assert "367.2" in hv and "fixed at (MC, GEN) = (50, 30)" in hv
    assert "\\caption{Hypervolume reference point (MC, GEN): fixed at" in (out / "hypervolume.tex").read_text()
    report_main(["--runs", str(se_root), "--out", str(out)])
    assert "1 below the smallest MC and GEN of the methods compared" in (out / "hypervolume.md").read_text()
    assert "6 experts (60.0, 39.0)" in (out / "hypervolume.md").read_text()


def test_plot_draws_error_bars_baseline_and_names_model_experts_eval(se_root):
    from matplotlib.container import ErrorbarContainer

    from analysis.plots import frontier_figure

    runs = collect_runs(se_root)
    fig = frontier_figure(runs)
    [ax] = fig.axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars, "no error bars drawn"
    # every run's MC bar spans mc ± mc_stderr (x) at its GEN (y), in the data's units
    spans = {tuple(np.round(seg, 6).ravel()) for c in bars for lines in c.lines[2] for seg in lines.get_segments()}
    for mc, gen, se_mc, se_gen in [(61.0, 55.2, 0.8, 1.12), (70.0, 40.0, 0.7, 1.3), (63.0, 58.0, 0.9, 1.2),
                                   (80.0, 70.0, 0.5, 0.6)]:
        assert tuple(np.round([mc - se_mc, gen, mc + se_mc, gen], 6)) in spans
        assert tuple(np.round([mc, gen - se_gen, mc, gen + se_gen], 6)) in spans
    stars = [c for c in ax.collections if c.get_label().startswith("Original")]
    assert len(stars) == 1 and list(stars[0].get_offsets()[0]) == pytest.approx([80.0, 70.0])
    title = ax.get_title()
    assert "toy-moe" in title and "6 of 8 experts" in title and "eval toy, limit 50" in title


def _label_boxes(fig):
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for ax in fig.axes for t in ax.texts
            if t.get_gid() in ("placed", "crowded")], renderer  # the text's box, leader lines aside


def test_mix_labels_do_not_overlap_each_other_or_points(paper):
    """On the paper's table (10 mixes x 4 methods per panel, frontiers close together) every frontier
    point gets its mix label, no two labels overlap and no label covers a point."""
    from analysis.plots import frontier_figure

    fig = frontier_figure(paper)
    boxes, renderer = _label_boxes(fig)
    fronts = frontiers(paper)
    assert len(boxes) == int(fronts["frontier_size"].sum())  # one label per frontier point
    assert sorted(text for text, _ in boxes) == sorted(f["mix"] for fr in fronts["frontier"] for f in fr)
    assert not [t for ax in fig.axes for t in ax.texts if t.get_gid() == "crowded"]
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), (a, b)
    for ax in fig.axes:
        pixels = ax.transData.transform(np.concatenate([c.get_offsets() for c in ax.collections]))
        for text, box in boxes:
            if box.overlaps(ax.get_window_extent(renderer)):
                assert not any(box.contains(x, y) for x, y in pixels), text


# ---------------------------------------------------------------- like with like: settings (docs/sweeps.md: Analysis)

SOURCES = {"general": {"path": "allenai/c4", "field": "text"}, "math": {"path": "AI-MO/NuminaMath-1.5"},
           "code": {"path": "bigcode/the-stack-smol"}}


def _one_line_refusal(message: str, *names):
    assert "\n" not in message and "--allow-mixed-settings" in message and "allow_mixed_settings=True" in message
    for name in names:
        assert name in message, name


def test_two_models_on_one_frontier_are_refused_naming_the_model(tmp_path):
    root = tmp_path / "models"
    write_full_run(root / "a", "reap", (0, 0.5, 0.5), 0.6, 0.5)
    write_full_run(root / "b", "reap", (1, 0, 0), 0.7, 0.4, config={"model": {"name": "other-moe"}})
    runs = collect_runs(root)
    for compare in (frontiers, tables.best_gen_table, tables.mix_table, tables.hypervolume_table,
                    lambda df: plot_frontiers(df, tmp_path / "fig")):
        with pytest.raises(SettingsMismatch) as caught:
            compare(runs)
        _one_line_refusal(str(caught.value), f"model.name: toy-moe (1 run: {root / 'a'})",
                          f"other-moe (1 run: {root / 'b'})")
    assert not (tmp_path / "fig.png").exists()
    # the uncompressed model's run of another model is refused too: its star would share the panels
    write_full_run(tmp_path / "base" / "none", "none", (1, 0, 0), 0.8, 0.7, config={"model": {"name": "other-moe"}})
    with pytest.raises(SettingsMismatch, match="model.name"):
        frontiers(pd.concat([collect_runs(root / "a"), collect_runs(tmp_path / "base")], ignore_index=True))


@pytest.fixture()
def group_size_root(tmp_path):
    """REAM at 6 experts: three mixes with group_size 16, two with 32; REAP beside it (no group_size)."""
    root = tmp_path / "gs"
    for name, mix, mc, gen, size in [("a", (1, 0, 0), 0.70, 0.40, 16), ("b", (0, 0.5, 0.5), 0.60, 0.55, 16),
                                     ("c", (0.5, 0.5, 0), 0.65, 0.45, 16), ("d", (1, 0, 0), 0.72, 0.41, 32),
                                     ("e", (0, 0.5, 0.5), 0.61, 0.57, 32)]:
        write_full_run(root / name, "ream", mix, mc, gen, config={"method": {"group_size": size}})
    write_full_run(root / "r", "reap", (1, 0, 0), 0.66, 0.42)
    return root


def test_two_settings_of_a_method_on_one_frontier_are_refused_naming_the_setting_and_runs(group_size_root):
    runs = collect_runs(group_size_root)
    for compare in (frontiers, tables.best_gen_table, tables.mix_table):
        with pytest.raises(SettingsMismatch) as caught:
            compare(runs)
        message = str(caught.value)
        runs_of = lambda *names: ", ".join(str(group_size_root / n) for n in names)
        _one_line_refusal(message, f"method.group_size [ream, 6 experts]: 16 (3 runs: {runs_of('a', 'b', 'c')}) "
                                   f"vs 32 (2 runs: {runs_of('d', 'e')})")
        assert "(method.group_size)" in message and "model." not in message
        assert str(group_size_root / "r") not in message
    runs.to_csv(group_size_root.parent / "runs.csv", index=False)  # the settings survive runs.csv
    with pytest.raises(SettingsMismatch, match="method.group_size"):
        frontiers(read_points_csv(group_size_root.parent / "runs.csv"))
    # one setting alone is fine, and the same setting may differ between frontiers (REAM's C follows the ratio)
    assert not frontiers(runs[~runs["run_dir"].str.endswith(("/d", "/e"))])["mixed_settings"].any()
    write_full_run(group_size_root / "f", "ream", (1, 0, 0), 0.5, 0.3, experts=4, config={"method": {"group_size": 32}})
    alike = collect_runs(group_size_root)
    alike = alike[~alike["run_dir"].str.endswith(("/d", "/e"))]
    assert set(frontiers(alike)["experts"]) == {6, 4}


def test_only_seeds_are_averaged(tmp_path):
    root = tmp_path / "seeds"
    write_full_run(root / "s0", "reap", (0, 0.5, 0.5), 0.60, 0.50, se=(0.010, 0.020), seed=0)
    write_full_run(root / "s1", "reap", (0, 0.5, 0.5), 0.64, 0.56, se=(0.012, 0.022), seed=1)
    write_full_run(root / "other", "reap", (1, 0, 0), 0.70, 0.40, seed=1)
    runs = collect_runs(root)
    assert runs["settings"].nunique() == 1  # the seed is not a setting
    table = frontiers(runs).set_index("method")
    assert table.loc["reap", "n_points"] == 2 and not table.loc["reap", "mixed_settings"]
    point = [p for p in table.loc["reap", "frontier"] if p["mix"] == "0:.5:.5"][0]
    assert (point["mc"], point["gen"]) == pytest.approx((62.0, 53.0))  # the mean of the two seeds
    assert point["mc_stderr"] == pytest.approx(1.1) and "setting" not in point
    # the calibration sampling seed picks other calibration texts: a calibration setting, never averaged
    write_full_run(root / "calib_seed", "reap", (0, 0.5, 0.5), 0.5, 0.5, config={"calib": {"seed": 7}})
    with pytest.raises(SettingsMismatch, match=r"calib\.seed: absent \(3 runs: .*\) vs 7 \(1 run: "):
        frontiers(collect_runs(root))


def test_calibration_sources_are_compared_only_where_read(tmp_path):
    root = tmp_path / "sources"
    write_full_run(root / "a", "reap", (1, 0, 0), 0.7, 0.4, config={"calib": {"sources": SOURCES}})
    write_full_run(root / "b", "reap", (0, 0.5, 0.5), 0.6, 0.5, config={"calib": {"sources": SOURCES}})
    runs = collect_runs(root).set_index("run_dir")
    assert "calib.sources.math.path" not in json.loads(runs.loc[str(root / "a"), "settings"])  # [1,0,0] reads general
    assert not frontiers(runs.reset_index())["mixed_settings"].any()  # the mixes read different sources: fine
    other = {**SOURCES, "general": {"path": "HuggingFaceFW/fineweb", "field": "text"}}
    write_full_run(root / "c", "ream", (0.5, 0.5, 0), 0.6, 0.5, config={"calib": {"sources": other}})
    write_full_run(root / "d", "ream", (0, 0, 1), 0.5, 0.6, config={"calib": {"sources": other, "n": 64}})
    with pytest.raises(SettingsMismatch) as caught:  # across methods: they share panels and reference points
        frontiers(collect_runs(root))
    message = str(caught.value)
    _one_line_refusal(message, f"calib.sources.general.path: allenai/c4 (1 run: {root / 'a'}) vs "
                               f"HuggingFaceFW/fineweb (1 run: {root / 'c'})", f"calib.n: absent (3 runs: ")
    sides = {key: re.search(rf"{re.escape(key)}: ([^;]*)", message).group(1)
             for key in ("calib.n", "calib.sources.general.path")}
    assert str(root / "d") in sides["calib.n"]
    assert str(root / "d") not in sides["calib.sources.general.path"]  # d reads no general text


def test_mixed_settings_can_be_compared_flagged_and_never_averaged(group_size_root, tmp_path):
    from analysis.plots import frontier_figure

    runs = collect_runs(group_size_root)
    with pytest.warns(UserWarning, match="different settings"):
        table = frontiers(runs, allow_mixed_settings=True).set_index("method")
    assert table["mixed_settings"].all()
    assert table.loc["ream", "n_points"] == 5  # per mix, group size 16 and 32 kept apart
    assert table.loc["ream", "settings"] == ["method.group_size=16", "method.group_size=32"]
    assert table.loc["reap", "settings"] == []
    assert {p.get("setting") for p in table.loc["ream", "frontier"]} <= {"method.group_size=16",
                                                                         "method.group_size=32"}
    with pytest.warns(UserWarning):
        best = tables.best_gen_table(runs, allow_mixed_settings=True)
        mix = tables.mix_table(runs, allow_mixed_settings=True)
        hv = tables.hypervolume_table(runs, allow_mixed_settings=True).set_index("method")
        fig = frontier_figure(runs, allow_mixed_settings=True)
    assert "setting" in best.columns and "setting" in mix.columns and "eval_setting" not in mix.columns
    assert len(mix[mix["mix"] == "1:0:0"]) == 3  # REAP's row, REAM's with C = 16 and with C = 32
    assert hv.loc["REAM", "settings"] == "method.group_size=16 / method.group_size=32"
    assert "method.group_size=32" in tables.to_markdown(mix) and "method.group\\_size=32" in tables.to_latex(best)
    assert "MIXED SETTINGS" in fig.axes[0].get_title()
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert any("[method.group_size=32]" in t for t in labels)
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match="error: .*differ in settings"):
        report_main(["--runs", str(group_size_root), "--out", str(out)])
    assert not out.exists()  # refused before anything was written
    with pytest.warns(UserWarning):
        report_main(["--runs", str(group_size_root), "--out", str(out), "--allow-mixed-settings"])
    fronts = {f["method"]: f for f in json.loads((out / "frontiers.json").read_text())}
    assert all(f["mixed_settings"] for f in fronts.values()) and len(fronts["ream"]["settings"]) == 2
    assert "setting" in (out / "mix_table.md").read_text()
    assert "method.group_size=32" in (out / "best_gen.md").read_text()


def test_pareto_cli_refuses_mixed_settings_in_one_line(group_size_root):
    refused = subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(group_size_root)],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith("error: ") and "method.group_size [ream, 6 experts]: 16 (3 runs" in refused.stderr
    allowed = subprocess.run([sys.executable, "-m", "analysis.pareto", "--runs", str(group_size_root),
                              "--allow-mixed-settings"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert all(f["mixed_settings"] for f in json.loads(allowed.stdout))


def _toy_config(*overrides):
    from hydra import compose, initialize_config_dir

    import ream_exp  # noqa: F401  (registers the resolvers conf/config.yaml uses)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _write_toy_run(path: Path, cfg, mc: float, identity: bool = True, config_text: str | None = None):
    """A run dir as ream_exp.run writes it: config.yaml (resolved), identity.json (unless `identity` is
    false: a run dir from before it), metrics.json."""
    from omegaconf import OmegaConf

    from ream_exp.identity import digest, run_identity
    from ream_exp.run_records import IDENTITY_FILE

    path.mkdir(parents=True)
    OmegaConf.save(cfg, path / "config.yaml", resolve=True)
    if config_text is not None:
        (path / "config.yaml").write_text(config_text)
    if identity:
        recorded = run_identity(cfg)
        (path / IDENTITY_FILE).write_text(json.dumps({"digest": digest(recorded), "identity": recorded}))
    metrics = {"status": "done", "method": cfg.method.name, "experts_after": 24, "mix": list(cfg.calib.mix),
               "eval": {"mc": mc, "gen": 0.5, "mc_tasks": ["toy_facts"], "gen_tasks": ["toy_arith"], "limit": None}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_an_old_run_dir_without_identity_json_still_collects_and_matches(tmp_path):
    from ream_exp import PACKAGE_DIR

    root = tmp_path / "toy"
    new = _write_toy_run(root / "new", _toy_config("method=ream", "seed=0"), 0.50)
    old = _write_toy_run(root / "old", _toy_config("method=ream", "seed=1"), 0.60, identity=False)
    # a run made from another clone of the package: config.yaml names its files there
    clone = tmp_path / "elsewhere" / "ream_exp"
    for rel in ("toy/data/calib_general.jsonl", "toy/data/calib_math.jsonl", "toy/data/calib_code.jsonl"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        (clone / rel).write_bytes((PACKAGE_DIR / rel).read_bytes())
    text = (new / "config.yaml").read_text().replace(str(PACKAGE_DIR / "toy" / "data"), str(clone / "toy" / "data"))
    assert str(clone) in text
    _write_toy_run(root / "clone", _toy_config("method=ream", "seed=2"), 0.70, identity=False, config_text=text)
    runs = collect_runs(root).set_index("run_dir")
    assert (runs["status"] == "done").all() and runs["settings"].nunique() == 1
    settings = json.loads(runs.loc[str(old), "settings"])
    assert settings["method.group_size"] == 16 and settings["model.weights"].startswith("files ")
    assert settings["calib.sources.general.path"].startswith("toy/data/calib_general.jsonl (sha256 ")
    assert "seed" not in settings and "calib.mix" not in settings and "ratio" not in settings
    point = frontiers(runs.reset_index()).iloc[0]
    assert point["n_points"] == 1 and point["frontier"][0]["mc"] == pytest.approx(60.0)  # three seeds, one point
    # identity.json, where there is one, is what the run depends on (not a config.yaml edited afterwards)
    edited = _write_toy_run(root / "edited", _toy_config("method=ream", "seed=3", "method.group_size=32"), 0.5)
    (edited / "config.yaml").write_text((new / "config.yaml").read_text())
    with pytest.raises(SettingsMismatch, match=rf"method.group_size \[ream, 24 experts\]: 16 \(3 runs: .*\) vs 32 "
                                               rf"\(1 run: {edited}\)"):
        frontiers(collect_runs(root))


def test_wandb_runs_carry_their_settings_like_run_dirs(tmp_path):
    from omegaconf import OmegaConf

    cfg = _toy_config("method=ream")
    local = _write_toy_run(tmp_path / "local" / "run", cfg, 0.5)
    config = OmegaConf.to_container(cfg, resolve=True)
    online = FakeRun({**config, "seed": 5, "_wandb": {"x": 1}},
                     {"status": "done", "method": "ream", "experts_after": 24,
                      "eval": {"mc": 0.6, "gen": 0.5, "mc_tasks": ["toy_facts"], "gen_tasks": ["toy_arith"],
                               "limit": None}})
    row = wandb_row(online)
    assert row["settings"] == collect_runs(local.parent)["settings"].iloc[0]
    recorded = json.loads((local / "identity.json").read_text())["identity"]  # as ream_exp.run logs it
    logged = FakeRun({**config, "model": {**config["model"], "path": "/gone"},
                      "identity": json.dumps(recorded)}, online.summary_metrics)
    assert wandb_row(logged)["settings"] == row["settings"]  # the model's weights as the run saw them
    other = FakeRun({**config, "calib": {**config["calib"], "n": 64}}, online.summary_metrics)
    both = pd.DataFrame([row, wandb_row(other)])
    with pytest.raises(SettingsMismatch, match=r"calib\.n: 128 \(1 run: wandb:me/ream-exp/abc123\) vs 64"):
        frontiers(both)


ARITH_PROTOCOL = {"variant": "lm-eval arith", "version": "1.0", "fewshot": 0, "metric": "exact_match",
                  "filter": "flexible-extract", "chat_template": True, "until": ["Q:"], "max_gen_toks": None}


def test_runs_with_a_different_gen_protocol_are_refused(tmp_path):
    """Same task sets, limit and shots, but one run scored its GEN task under another filter: refused,
    naming the GEN protocol and the run (docs/algorithms.md, "GEN protocol")."""
    root = tmp_path / "protocol"
    write_full_run(root / "a", "reap", (0, 0.5, 0.5), 0.61, 0.55, gen_protocol={"arith": ARITH_PROTOCOL})
    write_full_run(root / "b", "ream", (0, 0.5, 0.5), 0.63, 0.58, gen_protocol={"arith": ARITH_PROTOCOL})
    runs = collect_runs(root).set_index("run_dir")
    assert runs.loc[str(root / "a"), "gen_protocol"] == \
        "arith[lm-eval arith v1.0; 0-shot; exact_match,flexible-extract; chat]"
    frontiers(collect_runs(root))  # one protocol: compared
    write_full_run(root / "c", "ream", (1, 0, 0), 0.7, 0.3,
                   gen_protocol={"arith": {**ARITH_PROTOCOL, "filter": "strict-match"}})
    runs = collect_runs(root)
    with pytest.raises(EvalMismatch) as caught:
        frontiers(runs)
    message = str(caught.value)
    assert "(GEN protocol differ)" in message and str(root / "c") in message and "\n" not in message
    with pytest.warns(UserWarning, match="GEN protocol"):
        frontiers(runs, allow_mixed_evals=True)
    # a run from before the record (no gen_protocol) is not silently compared with one that has it
    write_full_run(tmp_path / "old" / "a", "reap", (0, 0.5, 0.5), 0.6, 0.5)
    write_full_run(tmp_path / "old" / "b", "ream", (0, 0.5, 0.5), 0.6, 0.5, gen_protocol={"arith": ARITH_PROTOCOL})
    with pytest.raises(EvalMismatch, match="GEN protocol"):
        frontiers(collect_runs(tmp_path / "old"))
