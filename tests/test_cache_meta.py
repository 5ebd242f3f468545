"""The record every cache entry keeps of what made it (ream_exp/cache_meta.py) and the reason it gives when an
entry was made otherwise; each cache's own test is beside the cache (test_stats_cache.py, test_calib_sources.py,
test_run.py)."""

import logging

import ream_exp
from ream_exp.cache_meta import CACHE_FORMAT, made_by, still_valid, why_stale


def test_a_record_names_format_package_code_and_extras_in_order():
    record = made_by({"observe": 1, "observation": 2}, tokenizer="ab" * 32)
    assert list(record.items()) == [("cache format", CACHE_FORMAT), ("ream-exp", ream_exp.__version__),
                                    ("observe code", 1), ("observation code", 2), ("tokenizer", "ab" * 32)]


def test_the_reason_names_what_differs():
    now = made_by({"observe": 2}, **{"lm-eval": "0.4.13", "task a": 1.0})
    assert why_stale(now, now) is None
    assert why_stale(None, now) == "was made by an unknown version (no record of what made it), this is observe code v2"
    assert why_stale({**now, "observe code": 1}, now) == "was made by observe code v1, this is v2"
    assert why_stale({**now, "ream-exp": "0.0.9"}, now) == f"was made by ream-exp 0.0.9, this is {ream_exp.__version__}"
    gone = {k: v for k, v in now.items() if k != "task a"}
    assert why_stale(gone, now) == "was made by task a (none recorded), this is v1.0"
    assert why_stale({**now, "task b": 3}, now) == "was made by task b v3, this has none"
    assert why_stale({**now, "tokenizer": "0" * 64}, {**now, "tokenizer": "f" * 64}) == \
        "was made by tokenizer 000000000000..., this is ffffffffffff..."


def test_many_differences_make_one_line():
    old = made_by({"evaluate": 1}, **{f"task t{i}": 1.0 for i in range(5)})
    new = made_by({"evaluate": 1}, **{f"task t{i}": 2.0 for i in range(5)})
    assert why_stale(old, new) == ("was made by task t0 v1.0, this is v2.0; task t1 v1.0, this is v2.0; "
                                   "task t2 v1.0, this is v2.0 (and 2 more differences)")


def test_still_valid_logs_one_line_only_when_stale(caplog):
    now = made_by({"observe": 2})
    with caplog.at_level(logging.INFO, logger="ream_exp"):
        assert still_valid("stats cache", "x.pt", dict(now), now)
        assert not still_valid("stats cache", "x.pt", {**now, "observe code": 1}, now)
    assert caplog.messages == ["stats cache x.pt was made by observe code v1, this is v2: recomputing"]
