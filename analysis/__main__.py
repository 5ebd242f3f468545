"""`python -m analysis ...` is `python -m analysis.report ...` (see analysis/report.py)."""

from analysis.report import main

main()
