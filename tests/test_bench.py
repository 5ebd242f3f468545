"""The benchmarks' one entry (python -m ream_exp.bench NAME) and what they share (ream_exp/bench/worker.py).
Nothing here times anything: the benchmarks measure, the tests check their plumbing."""

import argparse
import importlib
import json
import subprocess
import sys
import time

import pytest
import torch

from ream_exp import bench
from ream_exp.bench import merge, official, parity, roofline, scale, search, stream, worker


def test_every_benchmark_is_listed_and_has_a_main(capsys):
    with pytest.raises(SystemExit) as exit:
        bench.main(["--help"])
    assert exit.value.code == 0
    listing = capsys.readouterr().out
    for name, (module, _) in bench.BENCHMARKS.items():
        assert f"\n  {name} " in listing
        assert callable(importlib.import_module(f"ream_exp.bench.{module}").main)
    with pytest.raises(SystemExit):
        bench.main(["no_such_benchmark"])


def test_the_entry_runs_a_benchmark_with_its_own_flags():
    out = subprocess.run([sys.executable, "-m", "ream_exp.bench", "scale", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m ream_exp.bench scale")
    assert "--worker" not in out.stdout  # the worker flag is the benchmark's own business


@pytest.mark.parametrize("module, argv", [
    (scale, ["--device", "cpu", "--layers", "3", "--n", "4", "--seq-len", "32", "--experts", "8", "--ratio", "0.5"]),
    (stream, ["--layers", "2", "--experts", "4", "--top-k", "2", "--method", "reap", "--seq-len", "16"]),
])
def test_a_worker_gets_the_parents_settings(module, argv, tmp_path):
    parent = module._args(argv)
    flags = worker.forward(parent, module.FORWARDED)
    child = module._args(["--worker", "memory" if module is stream else "freq", "--dir", str(tmp_path), *flags])
    assert {k: getattr(child, k) for k in module.FORWARDED} == {k: getattr(parent, k) for k in module.FORWARDED}
    if module is scale:  # what the worker derives from them (dtype, defaults by device) agrees too
        assert (child.dtype, child.layers, child.n, child.seq_len) == (parent.dtype, 3, 4, 32)


def test_a_missing_work_directory_is_created(tmp_path, capsys):
    """--dir names the parent of the benchmark's temporary directory: a folder not there yet is made, not a
    FileNotFoundError from tempfile."""
    work = tmp_path / "not" / "yet"
    args = argparse.Namespace(worker=None, dir=str(work))
    worker.main_of("scale", args, None, lambda root, _args: root.parent, [], (),
                   lambda _root, built, results: f"built under {built}, {len(results)} jobs")
    assert capsys.readouterr().out.strip() == f"built under {work}, 0 jobs" and work.is_dir()


def test_memory_fields_are_bytes():
    assert 0 < worker.rss() <= worker.peak_rss()


def test_the_search_benchmark_reads_runs_in_order(tmp_path):
    grid = tmp_path / "grid"
    for i, (name, metrics) in enumerate([
        ("0", {"status": "done", "mix": [1, 0, 0], "eval": {"mc": 0.70, "gen": 0.10}}),
        ("1", {"status": "done", "mix": [0, 0.5, 0.5], "eval": {"mc": 0.75, "gen": 0.05}}),
    ]):
        (grid / name).mkdir(parents=True)
        (grid / name / "metrics.json").write_text(json.dumps(metrics))
    (grid / "2").mkdir()
    (grid / "2" / "error.txt").write_text("failed")
    points = search.grid_points(grid, lambda mix: ":".join(str(w) for w in mix))
    assert [p for _, p in points if p] == [pytest.approx((70, 10)), pytest.approx((75, 5))]
    assert len(points) == 3 and points[-1] == ("2", None)

    area = lambda pts, ref: sum(x - ref[0] for x, _ in pts)  # any area: only the order of calls matters
    assert search.hypervolumes([(2, 0), None, (3, 0)], (0, 0), area) == [2, 2, 5]


# ---- the merge benchmark's roofline (ream_exp/bench/merge.py, parity.py, roofline.py) -------------------------------

def test_the_roofline_counts_two_flops_per_multiply_add():
    assert roofline.Product(3, 5, 7, count=2).flops == 2 * 3 * 5 * 7 * 2
    n, t, h, i = 4, 10, 6, 3
    assert roofline.flops(roofline.dense(t, n, h, i)) == 4 * t * n * h * i  # gate and up of every expert
    assert roofline.aligned_counts([[0, 1, 2], [3], [4, 5]]) == (5, 3)  # experts computed, members aligned
    assert roofline.aligned_counts([[0, 1, 2], [3], [4, 5]], kept=2) == (3, 3)  # 0 and 1 kept from observing
    clock = roofline.PeakClock("cpu", torch.float32, reps=1)
    assert clock.seconds([roofline.Product(8, 8, 8, count=3)]) == pytest.approx(3 * clock.shape_seconds(8, 8, 8))


TINY_PARITY = dict(layers=2, experts=8, top_k=2, hidden=32, width=16, seqs=8, seq_len=16, ratio=0.5, group_size=4,
                   batch_size=4, std=0.2)


def test_the_parity_run_accounts_for_its_whole_time(tmp_path):
    """ream_official on a tiny stand-in of the parity model: every stage has a row, the rows add up to the run's
    time, the stages that do products have their FLOPs, and the merged weights are written for the comparison."""
    parity.prepare(tmp_path, TINY_PARITY)
    args = argparse.Namespace(threads=1, device="cpu", official=None, clock="cpu")
    threads, perf_counter = torch.get_num_threads(), time.perf_counter
    result = parity.ours(tmp_path, args)
    assert (torch.get_num_threads(), time.perf_counter) == (threads, perf_counter)  # the job's settings undone
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows)[:5] == ["observation", "propagation", "grouping", "PCA", "alignment"]
    assert sum(r["seconds"] for r in result["rows"]) == pytest.approx(result["seconds"])
    assert all(rows[s]["gflop"] > 0 for s in ("observation", "PCA", "alignment"))
    assert rows["observation"]["gflop"] > result["floor_gflop"] > 0  # the dense pass is part of observation
    merged = torch.load(tmp_path / "ours.pt")
    assert sorted(merged) == [0, 1] and merged[0]["gate"].shape == (4, 16, 32)
    lines = parity.report(TINY_PARITY, [result], [], tmp_path, args)
    assert any(line.startswith("REAM as a whole") and "ratio" in line for line in lines)
    bound = next(line for line in lines if line.startswith("every stage's products at peak"))
    assert float(bound.split(", ")[1].split(" times")[0]) >= 1  # observation's products include the floor's
    assert official.max_difference(merged, merged) == 0.0


def test_the_layer_benchmark_prints_each_stage(capsys):
    merge.main(["--shape", "layer", "--device", "cpu", "--experts", "8", "--hidden", "32", "--width", "16",
                "--top-k", "2", "--tokens", "64", "--sim-tokens", "16", "--chunk", "32", "--group-size", "4",
                "--ratio", "0.5"])
    out = capsys.readouterr().out
    for stage in ("plain forward", "observe, dense exact", "group", "PCA", "align", "Hungarian", "merge"):
        assert stage in out
    assert "REAM as a whole" in out and "of peak" in out and "every stage's products at peak" in out


def test_the_layer_benchmark_aligns_from_the_exact_observations_kept_products():
    """The stages share one scratch pool, as a run's do: the exact observation runs last, so the products it kept
    for the alignment are not overwritten by another variant's before the alignment reads them."""
    args = merge.parse(["--shape", "layer", "--device", "cpu", "--experts", "8", "--hidden", "32", "--width", "16",
                        "--top-k", "2", "--tokens", "64", "--sim-tokens", "16", "--chunk", "32", "--group-size",
                        "4", "--ratio", "0.5"])
    rows, summary = merge.layer_rows(args)
    assert summary["kept"] == 8  # every expert's alignment products came from the observing pass
    assert [r["stage"] for r in rows[1:4]] == ["observe, dense on 16 tokens", "observe, routing only",
                                               "observe, dense exact"]
    assert summary["total"] == pytest.approx(sum(r["seconds"] for r in rows[3:]))
