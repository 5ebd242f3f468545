"""ream-exp's code-executing lm-eval tasks, whose tests run in ream_exp.sandbox.

ream_exp.evaluation always adds this directory to lm-eval's task search path, after lm-eval's own
tasks, so a task here may take a built-in task's name (lm-eval logs that it overrides it):
- humaneval.yaml replaces lm-eval's humaneval: the built-in prompt, generation settings and scoring
  rule; only where the code runs changes;
- livecodebench.yaml is LiveCodeBench v6 code generation, which lm-eval does not ship
  (livecodebench.py: problems, prompt and scoring; livecodebench_harness.py: the in-sandbox driver).
"""

from pathlib import Path

CODE_TASKS_DIR = Path(__file__).parent
