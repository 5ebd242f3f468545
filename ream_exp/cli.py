"""The `ream-exp` command line: Hydra's task function around ream_exp.run.run, and the console script.

    ream-exp                                   # toy model, default method, ratio 0.25, eval=toy
    ream-exp model=local model.path=DIR method=reap ratio=0.5 eval=none logger=none hydra.run.dir=OUT
    ream-exp -m ratio=0.25,0.5                 # a sweep (multirun); python -m ream_exp.cli is the same

`hydra_main` is the Hydra task and `main` the console script, which prints errors raised on purpose
(ConfigError, Hydra's config composition errors) as one `error: ...` line. In a multirun a failed run is
logged in one line and the sweep goes on (ream_exp.sweep sums the sweep up).

Ctrl-C (KeyboardInterrupt) stops a run or a whole sweep with one line, `interrupted: <run dir>; relaunch
the same command to resume`, after a sweep's summary so far, and exit status 130; no traceback. The
relaunch skips the finished runs and sets the interrupted attempt aside (ream_exp.run_records).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import CONF_DIR as _CONF_DIR
from .config import ConfigError
from .rundir import RunDirRefusal
from .run import run
from .settings import composition_refusal
from .sweep import summarise_interrupted_sweep

log = logging.getLogger("ream_exp")

CONF_DIR = str(_CONF_DIR)  # conf/, of the checkout or the installed package (absolute: any working directory)
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT (128 + 2)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: KeyboardInterrupt (so Hydra passes it on untouched) naming the run's directory."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


# Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1); main() records it before it sets the
# variable itself, None when the task function runs without main().
_user_wants_traces: bool | None = None


def _full_error_wanted() -> bool:
    if _user_wants_traces is not None:
        return _user_wants_traces
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        return run(cfg, run_dir)
    except KeyboardInterrupt:  # stops a sweep too; main() says so in one line
        raise RunInterrupted(run_dir) from None
    except Exception as exc:  # run() has written error.txt, unless the directory refused the run
        if hc.mode == RunMode.MULTIRUN:  # one failed run must not sink the sweep
            details = "" if isinstance(exc, RunDirRefusal) else f"; details in {run_dir / 'error.txt'}"
            log.error("run failed (%s): %s%s", type(exc).__name__, _one_line(exc), details)
            return None
        if isinstance(exc, ConfigError) and not _full_error_wanted():
            # SystemExit passes Hydra's job runner (it catches Exception), so nothing else is printed.
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            sys.exit(1)
        raise


def _hydra_error_line(exc) -> str:
    """One line for a Hydra error: the missing option with the valid ones, or the override that did not parse."""
    refusal = composition_refusal(exc)  # `metod=reap`: not a setting at all (Hydra would suggest +metod=reap)
    if refusal:
        return refusal
    options = getattr(exc, "options", None)  # MissingConfigException: the group's valid options
    if options:
        return f"{str(exc).splitlines()[0]}; available: {', '.join(options)}"
    override = getattr(exc, "override", None)  # OverrideParseException
    return f"cannot parse override {override!r}: {_one_line(exc)}" if override else _one_line(exc)


def _interrupted(exc: KeyboardInterrupt) -> None:
    """Ctrl-C: the sweep's summary so far (a multirun), then one line naming the run it stopped; exit 130."""
    summarise_interrupted_sweep()
    run_dir = getattr(exc, "run_dir", None)
    print(f"interrupted{f': {run_dir}' if run_dir else ''}; relaunch the same command to resume", file=sys.stderr)
    sys.exit(INTERRUPTED_STATUS)


def main() -> None:
    """The `ream-exp` console script: Hydra's entry point, with errors raised on purpose as one line.

    Hydra prints its own errors (an unknown group option like method=foo, a bad override) over several
    lines unless HYDRA_FULL_ERROR=1, which makes it re-raise them; so it is set here, and those errors
    become `error: ...` too. Ctrl-C is one line too (see the module docstring). Every other exception keeps
    its full traceback.
    """
    global _user_wants_traces
    _user_wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        if _user_wants_traces:  # Hydra's own error reports, untouched
            hydra_main()
        else:
            _main_with_error_lines()
    except KeyboardInterrupt as exc:
        _interrupted(exc)


def _main_with_error_lines() -> None:
    from hydra.errors import CompactHydraException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except CompactHydraException as exc:  # config composition: unknown option, bad override syntax
        print(f"error: {_hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except ConfigError as exc:  # raised by a sweeper before any run (hydra/sweeper=mix_search)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    main()
