"""What the benchmarks that measure whole ream-exp runs share (scale and stream; legacy composes its run too).

Each measured run happens in a fresh subprocess, so that the memory it reports is its own and nothing of
the run before it is still resident:

    python -m ream_exp.bench NAME --worker JOB --dir ROOT FLAGS...

The parent (`in_fresh_process`) passes its settings on as command-line flags (`forward`); the worker
(`serve`) parses them with the same parser, runs JOB on ROOT and prints its result as JSON on the last line
of its output, which the parent reads back. `rss` and `peak_rss` are what the workers measure memory with;
`write_calibration` and `calibration_overrides` give a run random-text calibration files, `run_config` its
config.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

DOMAINS = ("general", "math", "code")


def add_worker_arguments(parser: argparse.ArgumentParser, jobs: tuple[str, ...] | None = None) -> None:
    """--dir (the work directory) and the hidden --worker JOB that makes a process a worker."""
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--worker", choices=jobs, help=argparse.SUPPRESS)


def forward(args: argparse.Namespace, names) -> list[str]:
    """The flags that give a worker the parent's settings `names`: --name value each, '_' written '-'."""
    return [x for k in names for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def in_fresh_process(bench: str, job: str, root: Path, flags: list[str]) -> dict:
    """Runs JOB of benchmark `bench` in a fresh Python process on `root`; the JSON result it printed last.
    Exits with the end of its stderr if it failed."""
    out = subprocess.run([sys.executable, "-m", __package__, bench, "--worker", job, "--dir", str(root), *flags],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{job} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_of(bench: str, args: argparse.Namespace, measure, build, jobs, forwarded, finish) -> None:
    """The whole main of a benchmark of whole runs. A worker (--worker JOB) serves its job; the parent builds the
    model in a temporary directory under --dir (created if missing; `build(root, args)`), runs each of `jobs` in a
    fresh process with the settings `forwarded`, and prints `finish(root, built, results)` (the report) while the
    directory exists."""
    if args.worker:
        return serve(measure, args)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)  # the temporary directory's parent
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        built = build(root, args)
        results = {job: in_fresh_process(bench, job, root, forward(args, forwarded)) for job in jobs}
        print(finish(root, built, results))


def serve(measure, args: argparse.Namespace) -> None:
    """The worker's side: `measure(root, args, job)`'s result, printed as one JSON line."""
    print(json.dumps(measure(Path(args.dir), args, args.worker)))


def _status(field: str) -> int:
    """A memory field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss() -> int:
    """This process's resident set now, in bytes."""
    return _status("VmRSS")


def peak_rss() -> int:
    """The largest resident set this process has had, in bytes (VmHWM)."""
    return _status("VmHWM")


def write_calibration(root: Path, n: int, chars: int) -> None:
    """root/{general,math,code}.jsonl: n random texts of `chars` letters and spaces each (seeded)."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz      "
    for domain in DOMAINS:
        texts = ["".join(rng.choice(letters) for _ in range(chars)) for _ in range(n)]
        (root / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def calibration_overrides(root: Path) -> list[str]:
    """The overrides that point calib=local's sources at write_calibration's files."""
    return [f"calib.sources.{d}.path={root / (d + '.jsonl')}" for d in DOMAINS]


def run_config(overrides: list[str]):
    """The run's config (conf/config.yaml) composed with `overrides`, as `ream-exp OVERRIDES` would."""
    from hydra import compose, initialize_config_dir

    from .. import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)
