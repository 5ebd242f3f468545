"""Seconds per stage: `timings = Timings(); with timings("load"): ...` adds the block's wall time to
timings["load"] (a stage entered twice sums both), rounded to 0.1 ms. A dict, so it is written as it is
(metrics.json's `timings`, a plan's info)."""

from __future__ import annotations

import contextlib
import time


class Timings(dict):
    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = round(self.get(stage, 0.0) + time.perf_counter() - start, 4)
