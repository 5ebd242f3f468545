"""ream-exp analysis: from run directories to the paper's Pareto frontiers, plots and tables.

Modules (each runnable on its own):
  collect.py  run dirs (or a W&B project) -> one row per run     python -m analysis.collect outputs/
  rows.py     one run's config + metrics -> its row; the columns (library; used by collect.py, wandb_runs.py)
  wandb_runs.py  a W&B project's runs -> rows                   (library; used by report.py)
  pareto.py   frontier + hypervolume per (method, experts)      python -m analysis.pareto --csv FILE
  settings.py what a frontier's runs must share (run identity)  (library; used by rows.py and pareto.py)
  plots.py    MC-vs-GEN scatter with frontier steps             (library; used by report.py)
  tables.py   best-GEN-mix table and the per-mix MC/GEN table   (library; used by report.py)
  bytes_frontier.py  scores against weight bytes: frontiers, budgets, hypervolume  (library; used by report.py)
  report.py   everything above into one folder                  python -m analysis.report --runs outputs/

Scores are percentage points everywhere in this package (collect_runs multiplies the fractions in
metrics.json by 100), the units of the paper's tables. Runs scored on different task sets
(mc_tasks / gen_tasks) are never compared silently: analysis.pareto refuses them unless allowed. Only
seeds are averaged: runs that differ in any other setting besides the calibration mix (the model, a
method's settings, calibration settings; analysis.settings) are refused likewise unless allowed.
"""
