"""Frontiers in bytes (analysis/bytes_frontier.py, docs/bytes.md): the frontier and hypervolume over
(bytes, score) against brute-force references written here, quantisations kept apart, the budget table,
runs without bytes left out and counted, and the report's files."""

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from analysis.bytes_frontier import bytes_budget_table, bytes_frontiers, bytes_hypervolume_table, bytes_points
from analysis.collect import collect_runs
from analysis.pareto import compared_points
from analysis.report import main as report_main
from analysis.tables import to_markdown

ORIGINAL = 1000  # the uncompressed model's weight bytes in these runs
BASE = (0.70, 0.60)  # its MC, GEN


def write_run(path: Path, method, experts, quant, scores, fraction, seed=0, mix=(0, 0.5, 0.5), with_bytes=True):
    """A finished run dir; weight bytes = fraction x ORIGINAL (none recorded when not with_bytes)."""
    path.mkdir(parents=True)
    config = {"model": {"name": "toy"}, "calib": {"mix": list(mix)}, "method": {"name": method}, "seed": seed}
    if quant is not None:
        config["quant"] = {"name": quant}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    mc, gen = scores
    metrics = {"status": "done", "method": method, "experts_before": 8, "experts_after": experts, "mix": list(mix),
               "eval": {"mc": mc, "gen": gen, "avg": (mc + gen) / 2, "mc_stderr": 0.01, "gen_stderr": 0.02},
               "baseline": {"mc": BASE[0], "gen": BASE[1]}}
    if with_bytes:
        metrics["weights"] = {"bytes": round(fraction * ORIGINAL), "expert_bytes": 1, "params": 1,
                              "active_params": 1, "measured": "disk"}
        metrics["weights_before"] = {"bytes": ORIGINAL, "measured": "disk"}
        metrics["baseline"]["weights"] = metrics["weights_before"]
    (path / "metrics.json").write_text(json.dumps(metrics))


# (method, experts, quant, (MC, GEN), bytes fraction)
POINTS = [
    ("reap", 6, None, (0.66, 0.50), 0.75),
    ("reap", 4, None, (0.55, 0.30), 0.50),
    ("reap", 6, "w4a16", (0.64, 0.47), 0.25),
    ("reap", 4, "w4a16", (0.50, 0.20), 0.15),
    ("ream", 6, None, (0.67, 0.55), 0.75),
    ("ream", 4, None, (0.60, 0.40), 0.50),
    ("ream", 6, "fp8", (0.66, 0.54), 0.40),
    ("none", 8, "w4a16", (0.68, 0.52), 0.30),
    ("none", 8, "fp8", (0.70, 0.59), 0.55),
]


@pytest.fixture()
def bytes_root(tmp_path):
    root = tmp_path / "runs"
    for i, (method, experts, quant, scores, fraction) in enumerate(POINTS):
        write_run(root / str(i), method, experts, quant, scores, fraction)
    return root


def brute_force_front(points):
    """Indices of the (bytes, score) points no other point beats: fewer or equal bytes and higher or equal
    score, one of them strictly."""
    return {i for i, (b, s) in enumerate(points)
            if not any(b2 <= b and s2 >= s and (b2 < b or s2 > s) for b2, s2 in points)}


def brute_force_area(points, ref):
    """Area of the union of the boxes [ref, (saved, score)] by summing the covered cells of the grid that
    every coordinate cuts."""
    xs = sorted({ref[0], *(p[0] for p in points)})
    ys = sorted({ref[1], *(p[1] for p in points)})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if x0 >= ref[0] and y0 >= ref[1] and any(p[0] >= x1 and p[1] >= y1 for p in points):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("score", ["mc", "gen", "avg"])
def test_frontier_and_hypervolume_match_brute_force(bytes_root, score):
    points, skipped = bytes_points(collect_runs(bytes_root))
    assert skipped == 0 and len(points) == len(POINTS) + 1  # and the uncompressed model, at ORIGINAL bytes
    fronts = bytes_frontiers(points)["scores"][score]
    xy = [(b, s) for b, s in zip(points["weight_bytes"], points[score])]
    expected = {(points["label"][i], points["weight_bytes"][i]) for i in brute_force_front(xy)}
    got = {(r["method"], r["quant"], r["weight_bytes"]) for r in fronts["frontiers"]["all"]["frontier"]}
    labels = dict(zip(zip(points["method"], points["quant"], points["weight_bytes"]), points["label"]))
    assert {(labels[k], k[2]) for k in got} == expected
    ref = fronts["reference"]
    assert ref == [0.0, pytest.approx(points[score].min() - 1)]
    saved = [(1 - b / ORIGINAL, s) for b, s in xy]
    assert fronts["frontiers"]["all"]["hypervolume"] == pytest.approx(brute_force_area(saved, ref))
    for method in ("reap", "ream", "none"):
        mine = [p for p, m in zip(saved, points["method"]) if m == method]
        assert fronts["frontiers"][method]["hypervolume"] == pytest.approx(brute_force_area(mine, ref))
    table = bytes_hypervolume_table(points).set_index("method")
    assert table.loc["all", f"HV {score.upper()}"] == pytest.approx(fronts["frontiers"]["all"]["hypervolume"])


def test_hand_made_frontier(bytes_root):
    """By hand, GEN: the uncompressed model (1000 bytes, 60), FP8 alone (550, 59), REAM+FP8 (400, 54),
    quantisation alone at W4A16 (300, 52), REAP+W4A16 at 6 experts (250, 47) and at 4 (150, 20)."""
    points, _ = bytes_points(collect_runs(bytes_root))
    front = bytes_frontiers(points)["scores"]["gen"]["frontiers"]["all"]["frontier"]
    assert [(r["weight_bytes"], round(r["gen"], 6)) for r in front] == \
        [(150, 20), (250, 47), (300, 52), (400, 54), (550, 59), (1000, 60)]
    assert front[1]["method"] == "reap" and front[1]["quant"] == "w4a16" and front[1]["experts"] == 6
    assert front[1]["gen_stderr"] == pytest.approx(2.0)


def test_budget_table_has_the_best_point_within_each_budget(bytes_root):
    points, _ = bytes_points(collect_runs(bytes_root))
    table = bytes_budget_table(points, (0.75, 0.5, 0.25, 0.1)).set_index(["budget", "score"])
    assert table.loc[("75%", "GEN"), "method"] == "Original + FP8"  # 59 at 55%, over REAM's 55 at 75%
    assert table.loc[("50%", "GEN"), "method"] == "REAM + FP8" and table.loc[("50%", "GEN"), "value"] == 54
    assert table.loc[("25%", "MC"), "method"] == "REAP + W4A16" and table.loc[("25%", "MC"), "bytes %"] == "25.0"
    assert table.loc[("10%", "AVG"), "method"] == "-"  # nothing fits
    assert "| 10%      | AVG     | -" in to_markdown(table.reset_index()) and "nan" not in to_markdown(table)


def test_quantisations_are_never_averaged(tmp_path):
    """Two seeds of one quant are one point; the same method, ratio, mix and seed under two quants are
    two, in bytes and in the MC-GEN frontiers."""
    root = tmp_path / "runs"
    write_run(root / "a", "reap", 6, None, (0.6, 0.5), 0.75, seed=0)
    write_run(root / "b", "reap", 6, None, (0.62, 0.52), 0.75, seed=1)
    write_run(root / "c", "reap", 6, "w4a16", (0.5, 0.4), 0.25, seed=0)
    runs = collect_runs(root)
    points, _ = bytes_points(runs)
    reap = points[points["method"] == "reap"].set_index("quant")
    assert len(reap) == 2 and reap.loc["none", "mc"] == pytest.approx(61)
    assert reap.loc["w4a16", "mc"] == pytest.approx(50)
    mc_gen = compared_points(runs).set_index("method")
    assert set(mc_gen.index) == {"reap", "reap@w4a16"} and mc_gen.loc["reap@w4a16", "mc"] == pytest.approx(50)


def test_runs_without_bytes_are_left_out_and_counted(bytes_root, tmp_path, capsys):
    write_run(bytes_root / "old1", "reap", 6, None, (0.9, 0.9), 0.1, mix=(0.5, 0.5, 0), with_bytes=False)
    write_run(bytes_root / "old2", "ream", 6, None, (0.9, 0.9), 0.1, mix=(0.5, 0.5, 0), with_bytes=False)
    out = tmp_path / "report"
    report_main(["--runs", str(bytes_root), "--out", str(out), "--budgets", "0.5,0.25"])
    assert "2 scored run(s) without recorded weight bytes" in capsys.readouterr().out
    fronts = json.loads((out / "bytes_frontiers.json").read_text())
    assert fronts["skipped_without_bytes"] == 2 and fronts["budgets"] == [0.5, 0.25]
    assert all(r["gen"] < 90 for r in fronts["scores"]["gen"]["frontiers"]["all"]["frontier"])
    for name in ("bytes_frontiers.png", "bytes_frontiers.pdf", "bytes_budgets.md", "bytes_budgets.tex",
                 "bytes_hypervolume.md", "bytes_hypervolume.tex", "hypervolume.md"):
        assert (out / name).stat().st_size > 0, name
    assert "2 scored run(s) without recorded weight bytes left out" in (out / "bytes_budgets.md").read_text()


def test_only_old_runs_never_crash(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "old", "reap", 6, None, (0.6, 0.5), 0.5, with_bytes=False)
    report_main(["--runs", str(root), "--out", str(tmp_path / "report")])
    fronts = json.loads((tmp_path / "report" / "bytes_frontiers.json").read_text())
    assert fronts["skipped_without_bytes"] == 1
    assert fronts["scores"]["avg"]["frontiers"]["all"] == {"hypervolume": 0.0, "n_points": 0, "frontier": []}
    assert (tmp_path / "report" / "bytes_frontiers.png").stat().st_size > 0
    assert math.isnan(collect_runs(root)["weight_bytes"].iloc[0])


def test_quant_name_is_a_key_and_its_settings_are_compared_within_one_quant():
    """quant.name separates points (never a mismatch); a quant's other settings must agree between its
    runs; a run without quant settings counts as quant none."""
    import pandas as pd

    from analysis.settings import SettingsMismatch, check_settings

    def rows(*quants):
        return pd.DataFrame([{"method": "reap", "experts": 6, "quant": name, "run_dir": f"run{i}",
                              "settings": json.dumps({"model.name": "toy", **settings})}
                             for i, (name, settings) in enumerate(quants)])

    w4 = lambda group: ("w4a16", {"quant.name": "w4a16", "quant.group_size": group})
    assert check_settings(rows(("none", {}), ("fp8", {"quant.name": "fp8"}), w4(32)))[0] is False
    assert check_settings(rows(w4(32), w4(32), ("none", {"quant.name": "none", "quant.group_size": 0})))[0] is False
    with pytest.raises(SettingsMismatch, match=r"quant.group_size \[quant w4a16\]: 32 .* vs 128"):
        check_settings(rows(w4(32), w4(32), w4(128)))
