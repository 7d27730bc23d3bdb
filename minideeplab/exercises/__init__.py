"""Exercises graded by the gradient checks: ``minideeplab exercises new DIR`` / ``check DIR`` (docs/exercises.md).

The solutions are kept in one place, the textbook layers (``minideeplab/textbook/*.py``) and the notebook sources
(``notebooks/cells/*.py``), between nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers. ``new_workspace``
writes a student's copy with each region replaced by a stub that raises ``NotImplementedError`` and a hint, or the
instructor's copy with the solutions in place; ``check_workspace`` imports a workspace's files from their path
(never the installed package) and grades every exercise against central differences and the package's fast layers.

    from minideeplab.exercises import new_workspace, check_workspace, format_report
    new_workspace("ws")
    results = check_workspace("ws")          # [Result(name, passed, fd_error, ref_error, wrong, hint, ...)]
"""
from __future__ import annotations

import importlib

# Imported on first use (PEP 562): the ``minideeplab`` command registers ``exercises`` through ``exercises.cli``,
# and importing the catalog here (the textbook, the graders) made every ``minideeplab train`` start 75-210 ms later.
_HOME = {"BY_NAME": "catalog", "EXERCISES": "catalog", "Exercise": "catalog", "Result": "grading",
         "check_workspace": "workspace", "format_report": "workspace", "json_report": "workspace",
         "new_workspace": "workspace"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
