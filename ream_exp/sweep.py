"""The end of a multirun: which runs were done, skipped or failed, and a non-zero exit if any failed.

`SweepSummary` is a Hydra callback (registered in conf/config.yaml under hydra.callbacks). A failed run
never stops the others (ream_exp.cli.hydra_main returns None for it in a multirun), so Hydra alone would
exit 0 after a sweep full of failures. The callback classifies each job as it ends, in the process that
ran it:

  failed   the job raised, or hydra_main returned None for it;
  skipped  it returned metrics and metrics.json is the very file that was there when the job started;
  done     it returned metrics from a fresh computation.

After the last job it prints one line per run and exits 1 if any failed. With a remote launcher
(hydra/launcher=slurm) the jobs end in other processes; the summary then says so, and each run's
outcome is in its directory (metrics.json or error.txt).

Ctrl-C stops the sweep: Hydra calls no callback then, so ream_exp.cli asks `summarise_interrupted_sweep`
for the summary so far, the run that was running marked `interrupted`, the runs not started left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .mix_labels import format_mix


def _stamp(path: Path):
    """What tells one version of a file from another: inode, size, modification time; None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _mix_label(config: DictConfig) -> str:
    """The run's calibration mix as ream_exp.mix_labels writes it ('.4:.3:.3'); '' when it has none."""
    try:
        mix = OmegaConf.select(config, "calib.mix")
        return format_mix(OmegaConf.to_container(mix) if OmegaConf.is_config(mix) else mix) or ""
    except (TypeError, ValueError, OmegaConfBaseException):  # a mix the run itself will refuse
        return ""


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# The SweepSummary of the multirun this process runs (between on_multirun_start and on_multirun_end)
_running: SweepSummary | None = None


class SweepSummary(Callback):
    def __init__(self) -> None:
        # (status, run directory, reason when failed, the run's calibration mix as a label)
        self.outcomes: list[tuple[str, Path, str, str]] = []
        self._before: dict[str, object] = {}
        self._job: tuple[Path, str] | None = None  # the job running now: its run directory and mix label

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _running
        _running = self

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        self._before = {name: _stamp(run_dir / name) for name in ("metrics.json", "error.txt")}
        self._job = (run_dir, _mix_label(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        self._job = None
        run_dir = Path(config.hydra.runtime.output_dir)
        mix = _mix_label(config)
        if job_return.status != JobStatus.COMPLETED or job_return.return_value is None:
            error = run_dir / "error.txt"
            fresh_error = error.exists() and _stamp(error) != self._before.get("error.txt")
            reason = _last_line(error) if fresh_error else "see the log above"
            self.outcomes.append(("failed", run_dir, reason, mix))
        elif self._before.get("metrics.json") is not None and \
                _stamp(run_dir / "metrics.json") == self._before["metrics.json"]:
            self.outcomes.append(("skipped", run_dir, "", mix))
        else:
            self.outcomes.append(("done", run_dir, "", mix))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        global _running
        _running = None
        if not self.outcomes:
            print("sweep summary: no run ended in this process (nothing was launched, or a remote launcher ran "
                  "them); see metrics.json or error.txt in each run directory")
            return
        self._print()
        if any(o[0] == "failed" for o in self.outcomes):
            sys.stdout.flush()
            sys.exit(1)  # SystemExit passes through Hydra's error reporting: a plain exit status, no trace

    def interrupted(self) -> None:
        """Ctrl-C: prints the summary so far, the job that was running marked interrupted."""
        if self._job is not None:
            run_dir, mix = self._job
            self.outcomes.append(("interrupted", run_dir, "", mix))
        self._print()
        sys.stdout.flush()

    def _print(self) -> None:
        counts = {status: sum(o[0] == status for o in self.outcomes)
                  for status in ("done", "skipped", "failed", "interrupted")}
        interrupted = f", {counts['interrupted']} interrupted" if counts["interrupted"] else ""
        print(f"sweep summary: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
              + interrupted)
        for status, run_dir, reason, mix in self.outcomes:
            print(f"  {status:<8} {run_dir}" + (f"  mix {mix}" if mix else "") + (f"  ({reason})" if reason else ""))


def summarise_interrupted_sweep() -> bool:
    """After Ctrl-C: prints the summary of the sweep this process was running (see the module docstring);
    False when it was running none."""
    if _running is None:
        return False
    _running.interrupted()
    return True
