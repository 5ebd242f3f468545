"""What made a cache entry: the one record every cache of the project keeps in its entries, and its check.

    record = made_by({"observe": STATS_VERSION})                 # written IN the entry
    if not still_valid("stats cache", path, entry.get("made_by"), made_by({"observe": STATS_VERSION})):
        ...                                                      # recompute, overwrite the entry
    require_current(recorded, current)                           # the same, raising StaleEntry instead

A record is a flat JSON-able mapping, label -> version, in a fixed order:

    "cache format"      CACHE_FORMAT: how entries are laid out (bump when the layout of any entry changes)
    "ream-exp"          ream_exp.__version__
    "<name> code"       each per-cache code version, an integer kept next to the code that computes the
                        entry (calib/cache.py FORMAT_VERSION, observe.py STATS_VERSION,
                        methods/observation.py OBSERVATION_VERSION, evaluation/scores.py EVAL_VERSION): bumped by
                        whoever changes that computation
    anything else       what else the entry depends on outside the key, e.g. "lm-eval", "task gsm8k",
                        "tokenizer" (see docs/caches.md for each cache's record)

An entry whose record differs from the current one in any label, or that has none (written before entries
recorded what made them: an unknown version), is recomputed, with ONE log line (report_stale) naming the
cache, the entry and what differed, e.g.

    stats cache outputs/.cache/stats/ab12.pt was made by observe code v1, this is v2: recomputing

Keys (identity.py, calib/cache.py) say which entry answers a question; records say whether the code that
wrote it still computes the same answer. Versions are kept out of the keys so that an entry made by other
code is found, reported and overwritten rather than silently left behind under another name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("ream_exp")

CACHE_FORMAT = 1  # bump when the layout of a cache entry (what is stored where in it) changes
SHOWN_DIFFERENCES = 3  # differences named in the log line; the rest are counted
_MISSING = object()


def made_by(code: Mapping[str, int], **extra) -> dict:
    """The record of what makes an entry now: the cache format, ream-exp's version, each `code` version
    (name -> the integer its module keeps) and the `extra` labels (label -> version), in that order."""
    import ream_exp  # at call time: a changed (or monkeypatched) __version__ is seen

    record = {"cache format": CACHE_FORMAT, "ream-exp": str(ream_exp.__version__)}
    record.update({f"{name} code": int(version) for name, version in code.items()})
    record.update(extra)
    return record


def _shown(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 16 else text[:12] + "..."  # digests: their start is enough to tell
    return f"v{value}"


def _difference(label: str, recorded: Mapping, current: Mapping) -> str:
    if label not in recorded:
        return f"{label} (none recorded), this is {_shown(current[label])}"
    if label not in current:
        return f"{label} {_shown(recorded[label])}, this has none"
    return f"{label} {_shown(recorded[label])}, this is {_shown(current[label])}"


def why_stale(recorded, current: Mapping) -> str | None:
    """None when `recorded` is `current`, else why not, as the end of a sentence 'the entry ...'."""
    if not isinstance(recorded, Mapping):
        first = next((label for label in current if label.endswith(" code")), None)
        now = f"{first} {_shown(current[first])}" if first else f"ream-exp {current['ream-exp']}"
        return f"was made by an unknown version (no record of what made it), this is {now}"
    labels = [*current, *(label for label in recorded if label not in current)]
    differing = [label for label in labels if recorded.get(label, _MISSING) != current.get(label, _MISSING)]
    if not differing:
        return None
    named = "; ".join(_difference(label, recorded, current) for label in differing[:SHOWN_DIFFERENCES])
    more = len(differing) - SHOWN_DIFFERENCES
    return f"was made by {named}" + (f" (and {more} more difference{'s' * (more > 1)})" if more > 0 else "")


class StaleEntry(Exception):
    """A cache entry made by other code than this (or not saying what made it); the message says how."""


def require_current(recorded, current: Mapping) -> None:
    """Raises StaleEntry, saying what differs, unless the entry's record `recorded` is `current`."""
    reason = why_stale(recorded, current)
    if reason is not None:
        raise StaleEntry(reason)


def report_stale(cache: str, path, reason) -> None:
    """The one log line of a stale entry: '<cache> <path> was made by <what>, this is <now>: recomputing'."""
    log.warning("%s %s %s: recomputing", cache, path, reason)


def still_valid(cache: str, path, recorded, current: Mapping) -> bool:
    """Whether an entry made as `recorded` says may be used now; when not, reports it (report_stale)."""
    try:
        require_current(recorded, current)
    except StaleEntry as exc:
        report_stale(cache, path, exc)
        return False
    return True


__all__ = ["CACHE_FORMAT", "StaleEntry", "made_by", "report_stale", "require_current", "still_valid", "why_stale"]
