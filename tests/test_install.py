"""A non-editable install works without the checkout (docs/getting-started.md, Install): the package built as a
wheel, installed in a fresh venv and run from an empty directory runs the default toy job, a toy sweep, the
report and the notebook, with conf/ and sweeps/ read from inside the installed package.

To stay fast the venv borrows this interpreter's installed dependencies (a .pth line naming its
site-packages; the editable install's finder there is not activated, as a .pth line only adds a path) and
gets the wheel alone (pip --no-deps, no index); the job is shrunk (calib.n=8, eval.limit=2) and the sweep
reuses its calibration, statistics and baseline caches."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["calib.n=8", "eval.limit=2", "logger=none"]
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "wandb", "multirun", ".cache", "tests", "docs")

pytestmark = pytest.mark.slow


STEPS: dict[str, float] = {}  # seconds per step, printed at the end (pytest -s)


def _run(args, cwd, env, timeout=600):
    began = time.monotonic()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "not a git repository" not in done.stderr, done.stderr[-3000:]
    STEPS[" ".join(Path(a).name for a in args[:3]) if args[1] != "-c" else "import"] = time.monotonic() - began
    return done


def _wheel(tmp: Path) -> Path:
    """The package as a user's `pip install <repo>` builds it, from a copy (no build/ left in the checkout)."""
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    args = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "wheel"), str(source)]
    try:
        import setuptools  # noqa: F401  (here: build with it, offline; else pip fetches it)
        args.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return next((tmp / "wheel").glob("ream_exp-*.whl"))


def _venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A fresh venv holding the wheel, its dependencies borrowed from this interpreter; (bin, site-packages)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_ream_exp_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return venv / "bin", site


def test_a_wheel_installed_in_a_fresh_venv_runs_the_job_a_sweep_the_report_and_the_notebook(tmp_path):
    started = time.monotonic()
    bin_dir, site = _venv(tmp_path, _wheel(tmp_path))
    python = str(bin_dir / "python")
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "REAM_EXP_CACHE", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONNOUSERSITE="1",
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),  # the notebook's kernel: this venv's python
               PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]))

    where = json.loads(_run([python, "-c", "import json, analysis, ream_exp; print(json.dumps([ream_exp.__file__, "
                             "analysis.__file__, str(ream_exp.CONF_DIR), str(ream_exp.SWEEPS_DIR)]))"],
                            work, env).stdout)
    for path in where:  # the installed copy, not the checkout nor the editable install
        assert Path(path).is_relative_to(site), where
    conf, sweeps = map(Path, where[2:])
    assert conf == site / "ream_exp" / "conf" and (conf / "config.yaml").is_file()
    assert sweeps == site / "ream_exp" / "sweeps" and (sweeps / "toy_pareto.yaml").is_file()

    # the default job (toy MoE, README: Two commands), shrunk
    _run([str(bin_dir / "ream-exp"), "method=freq", *SMALL], work, env)
    (run_dir,) = (work / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["ratio"] == 0.25
    assert f"path: {conf}" in (run_dir / ".hydra" / "hydra.yaml").read_text()

    # a toy sweep, as docs/sweeps.md gives it for an installed package: 2 runs
    _run([str(bin_dir / "ream-exp"), "-m", "--config-dir", str(sweeps), "--config-name", "toy_pareto",
          "method=freq", "ratio=0.25,0.5", "calib.mix=[0.4,0.3,0.3]", *SMALL], work, env)
    sweep = work / "outputs" / "sweeps" / "toy_pareto"
    assert len(list(sweep.glob("*/metrics.json"))) == 2

    # the report and the notebook (docs/sweeps.md: Analysis)
    _run([python, "-m", "analysis.report", "--runs", str(sweep.relative_to(work)), "--out", "report"], work, env)
    assert (work / "report" / "runs.csv").is_file() and (work / "report" / "frontiers.png").is_file()
    _run([python, "-m", "analysis.notebook", str(sweep.relative_to(work)), "--out", "notebook"], work, env)
    assert (work / "notebook" / "toy_pareto.ipynb").is_file() and (work / "notebook" / "frontiers.png").is_file()
    print(f"install test: {time.monotonic() - started:.0f} s;", ", ".join(f"{k}: {v:.0f} s" for k, v in STEPS.items()))
