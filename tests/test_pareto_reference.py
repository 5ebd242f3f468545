"""The hypervolume's reference point is (smallest MC - offset, smallest GEN - offset) over every method at an
expert count (docs/algorithms.md, Pareto analysis), for any offset: frontiers() and
`python -m analysis.pareto --offset`."""

import json

import pytest

from analysis.pareto import frontiers, main, read_points_csv
from tests.test_analysis import PAPER_CSV, inclusion_exclusion_area, paper_rows


def _expected(rows, experts, offset):
    at_count = [r for r in rows if r["experts"] == experts]
    return (min(r["mc"] for r in at_count) - offset, min(r["gen"] for r in at_count) - offset)


@pytest.mark.parametrize("offset", [0.0, 2.5])
def test_reference_point_and_hypervolume_follow_the_offset(offset):
    rows = paper_rows()
    table = frontiers(read_points_csv(PAPER_CSV), offset)
    assert len(table) == 8
    for r in table.itertuples(index=False):
        ref = _expected(rows, r.experts, offset)
        assert (r.ref_mc, r.ref_gen) == pytest.approx(ref)
        points = [(p["mc"], p["gen"]) for p in rows if p["method"] == r.method and p["experts"] == r.experts]
        assert r.hypervolume == pytest.approx(inclusion_exclusion_area(points, ref))


def test_cli_passes_the_offset(capsys):
    main(["--csv", str(PAPER_CSV), "--offset", "3"])
    rows = paper_rows()
    for entry in json.loads(capsys.readouterr().out):
        assert entry["reference"] == pytest.approx(_expected(rows, entry["experts"], 3.0))
