"""Write the teaching notebooks (without outputs) from the cell sources in ``notebooks/cells/``.

Each ``cells/NN_name.py`` holds the cells of one notebook, separated by lines ``# %% [markdown]`` or ``# %%``
(the "percent" format editors understand). Run ``python notebooks/build_notebooks.py`` after editing a cell
file; ``tests/test_notebooks.py`` executes every notebook with ``MINIDEEPLAB_SHORT=1``.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def parse_cells(text: str):
    cells, kind, lines = [], None, []

    def flush():
        src = "\n".join(lines).strip("\n")
        if kind is not None and src:
            if kind == "markdown":
                src = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in src.split("\n"))
                cells.append(nbformat.v4.new_markdown_cell(src))
            else:
                cells.append(nbformat.v4.new_code_cell(src))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def build(source: Path, target: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = parse_cells(source.read_text())
    for i, cell in enumerate(nb.cells):   # stable ids: rebuilding an unchanged notebook gives the same file
        cell["id"] = f"{source.stem[:2]}-{i:02d}"
    nbformat.validate(nb)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ipynb", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        nbformat.write(nb, f)
    os.replace(tmp, target)


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or sorted(p.stem for p in (HERE / "cells").glob("*.py"))
    for name in names:
        build(HERE / "cells" / f"{name}.py", HERE / f"{name}.ipynb")
        print(f"notebooks/{name}.ipynb")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
