"""One process at a time in a run directory, and nothing of an earlier attempt lost.

`hold_run_dir(run_dir)` holds an OS file lock on run_dir/.lock (the `filelock` package: flock on Linux)
for the whole run. The kernel drops such a lock when its process dies, however it dies (kill -9,
preemption, out of memory), so a dead holder never blocks a relaunch. Beside the lock, .lock-holder.json
names the holder (pid, host, start time) and is removed on release: finding one when the lock is free
means the last holder died holding it, a stale lock, taken over with a warning. A second process into a
held directory gets `RunDirBusy` at once, naming the holder.

Where the filesystem refuses flock (`FLOCK_REFUSED`: Lustre mounted without flock, NFS without a lock
daemon; docs/running.md), one warning says so and .lock-holder.json alone is the lock: it is created
whole and atomically (a hard link to a finished temporary file, safe on NFS), so only one process gets it.
Nothing drops it when its holder dies, so a relaunch takes it over only when it names a dead process of
this host; one naming another host is refused, with the file to delete if its holder is known to be gone.

`set_aside(run_dir, names)` moves what an unfinished attempt left to attempts/<time>-<unique>/.

`hydra_job_files(run_dir)` writes what Hydra would write into a job's directory (.hydra/*.yaml and the
job's log file). conf/config.yaml turns Hydra's own writing off (hydra.output_subdir: null, a console-only
job_logging) because Hydra writes before any of our code runs, so a refused run would rewrite the
.hydra/ files and append to the log of the run it was refused from. Here they are written only by the
process that holds the directory and is about to compute in it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from .atomic import atomic_write
from .config import ConfigError

log = logging.getLogger("ream_exp")

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock-holder.json"
HYDRA_RECORDS = ".hydra"  # where Hydra keeps config.yaml, hydra.yaml, overrides.yaml by default
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job log format


class RunDirRefusal(ConfigError):
    """The run directory cannot take this run; nothing is written into it."""


class RunDirBusy(RunDirRefusal):
    """Another live process holds the run directory."""


class RunDirTaken(RunDirRefusal, FileExistsError):
    """The run directory holds the finished results of another config."""


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _dead_here(holder: dict | None) -> bool:
    """Whether `holder` names a process of this host that no longer runs."""
    return bool(holder) and holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _refusal(run_dir: Path, hint: str = "") -> RunDirBusy:
    holder = _read_holder(run_dir / HOLDER_NAME)
    if _dead_here(holder):
        holder = None  # the record of a dead holder: the live one has not written its own yet
    return RunDirBusy(f"run directory {run_dir} is in use by {_describe(holder)}; wait for it to finish "
                      f"or choose another hydra.run.dir{hint}")


def _warn_took_over(run_dir: Path, dead: dict) -> None:
    log.warning("run directory %s: took over the lock of %s, which died without releasing it",
                run_dir, _describe(dead))


# What flock answers where a filesystem cannot lock (docs/running.md): ENOSYS (Lustre mounted without
# -o flock, FUSE filesystems without locking), ENOLCK (NFS whose lock daemon, lockd/statd, is not running or
# not reachable), EOPNOTSUPP/ENOTSUP (filesystems that reject the call). EACCES, EAGAIN and EWOULDBLOCK mean
# another process holds the lock (filelock reports them as Timeout), never a refusal.
FLOCK_REFUSED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


def _flock(run_dir: Path) -> FileLock | None:
    """The OS lock on run_dir/.lock, or None where the filesystem refuses flock; RunDirBusy if it is held."""
    # fallback_to_soft=False: ENOSYS comes here too, to the same fallback as the other refusals
    lock = FileLock(str(run_dir / LOCK_NAME), fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _refusal(run_dir) from None
    except OSError as exc:
        if exc.errno not in FLOCK_REFUSED:
            raise
        log.warning("run directory %s: the filesystem refuses flock (%s: %s); %s alone locks it",
                    run_dir, errno.errorcode[exc.errno], os.strerror(exc.errno), HOLDER_NAME)
        return None
    return lock


def _record_holder(run_dir: Path) -> None:
    """Under flock: name this process in .lock-holder.json; one left there was a holder that died holding it."""
    stale = _read_holder(run_dir / HOLDER_NAME)
    if stale is not None:
        _warn_took_over(run_dir, stale)
    atomic_write(run_dir / HOLDER_NAME, lambda f: f.write(json.dumps(_this_process()).encode()))


def _link_holder(run_dir: Path) -> bool:
    """Create .lock-holder.json naming this process unless it exists; True if this process created it.

    A hard link to a finished temporary file: atomic on NFS too, and the file is never seen half-written.
    The link count, not link's answer, says whether it took (open(2) on O_EXCL: a retried NFS link can
    answer EEXIST for a link it made)."""
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".lock-claim-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(_this_process()).encode())
        with suppress(FileExistsError):
            os.link(tmp, run_dir / HOLDER_NAME)
        return os.stat(tmp).st_nlink == 2
    finally:
        os.unlink(tmp)


def _remove_dead(run_dir: Path, dead: dict) -> bool:
    """Move the dead holder's .lock-holder.json away; False if another process took it over first."""
    aside = run_dir / f".lock-dead-{uuid.uuid4().hex}"
    try:
        os.rename(run_dir / HOLDER_NAME, aside)
    except FileNotFoundError:
        return False
    taken = _read_holder(aside) != dead  # a live claim replaced the dead one after we read it: put it back
    if taken:
        with suppress(FileExistsError):
            os.link(aside, run_dir / HOLDER_NAME)
    aside.unlink()
    return not taken


def _claim_holder_file(run_dir: Path) -> None:
    """Without flock: hold run_dir by creating .lock-holder.json, taking over a dead holder's of this host."""
    if _link_holder(run_dir):
        return
    holder = _read_holder(run_dir / HOLDER_NAME)
    if _dead_here(holder) and _remove_dead(run_dir, holder) and _link_holder(run_dir):
        _warn_took_over(run_dir, holder)
        return
    raise _refusal(run_dir, f" (no flock on this filesystem: if that process is gone, delete "
                            f"{run_dir / HOLDER_NAME} and relaunch)")


@contextmanager
def hold_run_dir(run_dir: Path):
    """Hold `run_dir` for this process; raise RunDirBusy at once if another live process holds it."""
    lock = _flock(run_dir)
    try:
        if lock is None:
            _claim_holder_file(run_dir)
        else:
            _record_holder(run_dir)
        try:
            yield
        finally:
            (run_dir / HOLDER_NAME).unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.release()


def set_aside(run_dir: Path, names) -> Path:
    """Move `names` (files or folders in run_dir) to a new attempts/<time>-<unique>/ folder."""
    attempts = run_dir / "attempts"
    attempts.mkdir(exist_ok=True)
    # the unique suffix keeps two attempts within one second apart
    attempt = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=attempts))
    for name in names:
        os.replace(run_dir / name, attempt / name)
    return attempt


def _hydra_job_for(run_dir: Path):
    """Hydra's config when this process is the Hydra job whose output directory is run_dir, else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.instance().cfg
    output_dir = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir")
    return hydra_cfg if output_dir and Path(output_dir).resolve() == run_dir.resolve() else None


@contextmanager
def hydra_job_files(run_dir: Path, cfg):
    """Under Hydra: write .hydra/*.yaml and log to <job name>.log in run_dir while the block runs."""
    hydra_cfg = _hydra_job_for(run_dir)
    if hydra_cfg is None:
        yield
        return
    records = run_dir / HYDRA_RECORDS
    records.mkdir(exist_ok=True)
    OmegaConf.save(cfg, records / "config.yaml")
    OmegaConf.save(hydra_cfg, records / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, records / "overrides.yaml")
    handler = logging.FileHandler(run_dir / f"{hydra_cfg.hydra.job.name}.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
