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
from .catalog import BY_NAME, EXERCISES, Exercise
from .grading import Result
from .workspace import check_workspace, format_report, json_report, new_workspace

__all__ = ["BY_NAME", "EXERCISES", "Exercise", "Result", "check_workspace", "format_report", "json_report",
           "new_workspace"]
