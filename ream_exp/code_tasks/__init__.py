"""lm-eval tasks that replace built-in code-executing ones so that their tests run in ream_exp.sandbox.

ream_exp.evaluate always adds this directory to lm-eval's task search path, after lm-eval's own
tasks, so a task here takes the built-in task's name (lm-eval logs that it overrides it). Each one
keeps the built-in prompt, generation settings and scoring rule; only where the code runs changes.
"""

from pathlib import Path

CODE_TASKS_DIR = Path(__file__).parent
