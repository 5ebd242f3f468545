"""Runs analysis/notebooks/toy_pareto.ipynb top to bottom on a sweep directory, without Jupyter's UI.

    python -m analysis.notebook outputs/sweeps/toy_pareto [--out DIR] [--ref MC,GEN]

Works from a checkout and from an installed package (the notebook ships inside `analysis`). The sweep
directory (any folder of run directories) reaches the notebook as REAM_EXP_RUNS, --out as
REAM_EXP_REPORT (default <runs>/report: frontiers.png/.pdf), --ref as REAM_EXP_REF; the executed notebook,
with its tables and figure, is saved as <out>/toy_pareto.ipynb. Relative paths are read from the
working directory. Needs nbclient and a python3 Jupyter kernel (ipykernel): `pip install ream-exp[notebook]`.
"""

import argparse
import os
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent / "notebooks" / "toy_pareto.ipynb"


def run_notebook(runs, out=None, ref: str | None = None, timeout: int = 600) -> Path:
    """Executes the notebook on `runs`; returns the path of the executed copy."""
    import nbclient
    import nbformat

    runs = Path(runs).expanduser().resolve()
    if not runs.is_dir():
        raise SystemExit(f"error: no such sweep directory: {runs}")
    out = Path(out).expanduser().resolve() if out else runs / "report"
    settings = {"REAM_EXP_RUNS": str(runs), "REAM_EXP_REPORT": str(out), "REAM_EXP_REF": ref or ""}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(Path.cwd())}}).execute()
    finally:
        for key, value in previous.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / NOTEBOOK.name
    nbformat.write(nb, executed)
    return executed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", help="the sweep directory (a folder of run directories)")
    parser.add_argument("--out", help="where the figures and the executed notebook go (default <runs>/report)")
    parser.add_argument("--ref", metavar="MC,GEN", help="a fixed hypervolume reference point")
    args = parser.parse_args(argv)
    print(f"wrote {run_notebook(args.runs, args.out, args.ref)}")


if __name__ == "__main__":
    main()
