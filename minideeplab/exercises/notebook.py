"""The notebooks from their percent-format sources (``notebooks/cells/NN_name.py``), in either version.

One parser and one writer serve ``notebooks/build_notebooks.py`` (the repository's notebooks: the instructor's
version, stored without outputs) and ``minideeplab exercises new`` (a workspace's notebooks). The writer produces
the JSON ``nbformat.write`` produces (nbformat 4.5, one line per source line), without needing nbformat.
"""
from __future__ import annotations

import json
from pathlib import Path

from .regions import drop_markers, find_regions, student_code, student_markdown

VERSIONS = ("instructor", "student")


def parse_cells(text: str) -> list[tuple[str, str]]:
    """``[(kind, source)]`` of a percent-format file: cells start at lines ``# %%`` (code) or ``# %% [markdown]``;
    a markdown cell's lines lose their leading ``# ``; empty cells are dropped."""
    cells, kind, lines = [], None, []

    def flush():
        src = "\n".join(lines).strip("\n")
        if kind is not None and src:
            if kind == "markdown":
                src = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in src.split("\n"))
            cells.append((kind, src))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def versioned_cells(text: str, version: str, where: str = "<cells>") -> list[tuple[str, str]]:
    """The cells of one version: "instructor" (solutions and answers in place, markers dropped) or "student"
    (code regions replaced by a stub that raises ``NotImplementedError``, answers by a placeholder)."""
    if version not in VERSIONS:
        raise ValueError(f"notebook version must be one of {VERSIONS}, got {version!r}")
    out = []
    for i, (kind, src) in enumerate(parse_cells(text)):
        cell = f"{where}, cell {i}"
        if version == "instructor":
            src = drop_markers(src, cell)
        elif kind == "code":
            src = student_code(src, cell)
        else:
            src = student_markdown(src, cell)
        out.append((kind, src))
    return out


def has_regions(source: str) -> bool:
    return bool(find_regions(source))


def notebook_json(cells: list[tuple[str, str]], id_prefix: str) -> str:
    """The ``.ipynb`` text of ``cells`` (no outputs) with stable cell ids ``{id_prefix}-{i:02d}``: rebuilding an
    unchanged notebook gives the same file."""
    nb_cells = []
    for i, (kind, src) in enumerate(cells):
        cell = {"cell_type": kind, "id": f"{id_prefix}-{i:02d}", "metadata": {}, "source": src.splitlines(True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        nb_cells.append(cell)
    nb = {"cells": nb_cells,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(nb, indent=1, sort_keys=True, separators=(",", ": "), ensure_ascii=False) + "\n"


def cell_sources_dir() -> Path | None:
    """Where the notebook sources are: ``minideeplab/exercises/notebook_cells`` in a wheel (pyproject.toml copies
    ``notebooks/cells`` there), else ``notebooks/cells`` of the source checkout the package runs from; None when
    neither exists."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "notebook_cells", here.parents[1] / "notebooks" / "cells"):
        if candidate.is_dir() and any(candidate.glob("[0-9][0-9]_*.py")):
            return candidate
    return None
