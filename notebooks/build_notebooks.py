"""Write the teaching notebooks (without outputs) from the cell sources in ``notebooks/cells/``.

Each ``cells/NN_name.py`` holds the cells of one notebook, separated by lines ``# %% [markdown]`` or ``# %%``
(the "percent" format editors understand). Run ``python notebooks/build_notebooks.py`` after editing a cell
file; ``tests/test_notebooks.py`` executes every notebook with ``MINIDEEPLAB_SHORT=1``.

The notebooks written here are the instructor's version: code to write and answers to the written questions sit in
place, between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` in the sources, and the markers are dropped.
``minideeplab exercises new`` writes the student's version from the same sources (docs/exercises.md). Parser and
writer live in ``minideeplab.exercises.notebook``, so both versions come from one place.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from minideeplab.exercises.notebook import notebook_json, versioned_cells

HERE = Path(__file__).resolve().parent


def build(source: Path, target: Path) -> None:
    text = notebook_json(versioned_cells(source.read_text(), "instructor", str(source)), source.stem[:2])
    try:
        import nbformat
        nbformat.validate(nbformat.reads(text, as_version=4))
    except ImportError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ipynb", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, target)


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(p.stem for p in (HERE / "cells").glob("*.py"))
    for name in names:
        build(HERE / "cells" / f"{name}.py", HERE / f"{name}.ipynb")
        print(f"notebooks/{name}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
