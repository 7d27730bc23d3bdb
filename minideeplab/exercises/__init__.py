"""Exercises graded by the gradient checks (docs/exercises.md): the solution regions and the notebooks."""
