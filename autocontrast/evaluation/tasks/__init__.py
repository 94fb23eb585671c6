"""Offline lm-eval tasks (YAML + loaders) that read local files instead of the hub.

`TASKS_DIR` is what to give lm-eval's `TaskManager(include_path=...)` (the `python -m
autocontrast.evaluation.lm_eval` entry point does it for you).

>>> from lm_eval.tasks import TaskManager
>>> manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # doctest: +SKIP
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
