"""How the website shows the solutions: the written answers folded, the code solutions marked (docs/website.md).

The repository's notebooks are the instructor's version: ``notebooks/build_notebooks.py`` writes the answers to the
written questions and the code of the notebooks' small exercises in place, without the ``### BEGIN SOLUTION`` /
``### END SOLUTION`` markers of their sources (``notebooks/cells/NN_*.py``). The site should let a student try a
question before reading its answer, so the copy it renders is rewritten from the marked sources:

- in a markdown cell, each answer becomes a collapsed ``<details class="tip answer">`` block (its ``### HINT:`` lines, if
  any, stay visible above it);
- in a code cell, the solution lines stay (the outputs below were computed with them) between two comment lines
  saying that a student's notebook has a stub there.

Nothing else changes, and nothing in git: the notebooks stay as they are; the executed copy
(``execute_notebooks.py``) is rewritten into ``build/site-notebooks/<mode>-site/``. The check that the stored
notebook is what its source builds guards the cell-by-cell rewrite (a stale notebook fails the build). The same
rule makes the page of all written questions (``questions_page``).
"""
from __future__ import annotations

import json
from pathlib import Path

SUMMARY = "Answer (try the question first; click to show)"
CODE_BEGIN = "# ---- solution: a student's notebook (`minideeplab exercises new`) has a stub here ----"
CODE_END = "# ---- end of the solution ----"
MATHJAX = "assets/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"   # copied by hooks.on_post_build


class StaleNotebook(RuntimeError):
    """A notebook whose cells differ from what ``notebooks/build_notebooks.py`` writes from its source."""


def _rewrite(text: str, where: str, replacement) -> str:
    from minideeplab.exercises.regions import find_regions, is_marker

    lines = text.split("\n")
    for region in reversed(find_regions(text, where)):
        body = [line for line in lines[region.begin:region.end - 1] if not is_marker(line)]
        lines[region.begin - 1:region.end] = replacement(region, body)
    return "\n".join(lines)


def fold_markdown(text: str, where: str = "<cell>", html: bool = True) -> str:
    """A markdown text with each answer region folded: a collapsed ``<details>`` block in HTML (a notebook's cell:
    Jupyter's Markdown parses the Markdown inside it), or with ``html=False`` in pymdownx.details' syntax (a MkDocs
    page: Python-Markdown leaves the inside of an HTML block unparsed)."""
    def folded(region, body):
        ind = region.indent
        hint = [f"{ind}*Hint: {region.hint}*", ""] if region.hint else []
        if not html:
            return hint + [f'{ind}??? tip "{SUMMARY}"', *(f"{ind}    {line[len(ind):]}" if line.strip() else ""
                                                       for line in body)]
        return hint + [f'{ind}<details class="tip answer">', f"{ind}<summary>{SUMMARY}</summary>", "", *body, "",
                       f"{ind}</details>"]
    return _rewrite(text, where, folded)


def mark_code(text: str, where: str = "<cell>") -> str:
    """A code cell with each solution region between two comment lines (the code itself unchanged)."""
    return _rewrite(text, where, lambda region, body: [region.indent + CODE_BEGIN, *body, region.indent + CODE_END])


def site_cells(source: Path) -> list[tuple[str, str, str]]:
    """``[(kind, instructor source, site source)]`` of the cells of ``notebooks/cells/NN_*.py``."""
    from minideeplab.exercises.notebook import parse_cells, versioned_cells

    text = source.read_text(encoding="utf-8")
    raw = parse_cells(text)
    instructor = versioned_cells(text, "instructor", str(source))
    out = []
    for i, ((kind, marked), (_, plain)) in enumerate(zip(raw, instructor)):
        where = f"{source}, cell {i}"
        out.append((kind, plain, fold_markdown(marked, where) if kind == "markdown" else mark_code(marked, where)))
    return out


def site_notebook(root: Path, executed: Path, target: Path) -> Path:
    """Write the site's copy of the executed notebook ``executed`` into ``target``; return the path to render.

    Returns ``executed`` itself when the notebook has no cell source (``notebooks/cells/<stem>.py``). ``target`` is
    written only when its text changes, so mkdocs-jupyter's cache (keyed on the file's bytes) keeps its rendering.

    Raises:
        StaleNotebook: the executed notebook's cells are not those its cell source builds.
    """
    source = root / "notebooks" / "cells" / f"{executed.stem}.py"
    if not source.is_file():
        return executed
    cells = site_cells(source)
    nb = json.loads(executed.read_text(encoding="utf-8"))
    stored = [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
    if stored != [(kind, plain) for kind, plain, _ in cells]:
        first = next((i for i, (a, b) in enumerate(zip(stored, cells)) if a != b[:2]), min(len(stored), len(cells)))
        raise StaleNotebook(f"notebooks/{executed.name} is not what notebooks/build_notebooks.py writes from "
                            f"notebooks/cells/{source.name} (first difference at cell {first}): run "
                            "python notebooks/build_notebooks.py")
    for cell, (_, _, shown) in zip(nb["cells"], cells):
        cell["source"] = shown.splitlines(True)
    text = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    return target


def questions_page(root: Path) -> str:
    """Markdown for the page of every notebook's written questions, the answers folded."""
    lines = ["# Written questions", "",
             "The written questions at the end of each notebook, gathered on one page. Each answer is folded: try "
             "the question first, then click to compare. A student's workspace (`minideeplab exercises new DIR`, "
             "[the exercises](exercises.md)) has the same questions without the answers, in its notebooks and in "
             "`QUESTIONS.md`. The answers' numbers are computed with the package, and `tests/test_exercises.py` "
             "recomputes them.", "",
             # the notebook pages load MathJax through mkdocs-jupyter; this page is Markdown (pymdownx.arithmatex)
             f'<script src="../{MATHJAX}"></script>', ""]
    from minideeplab.exercises.notebook import parse_cells
    from minideeplab.exercises.regions import find_regions

    for source in sorted((root / "notebooks" / "cells").glob("[0-9][0-9]_*.py")):
        cells = parse_cells(source.read_text(encoding="utf-8"))
        answers = [fold_markdown(src, f"{source}, cell {i}", html=False)
                   for i, (kind, src) in enumerate(cells) if kind == "markdown" and find_regions(src)]
        if not answers:
            continue
        title = cells[0][1].split("\n")[0].lstrip("# ").strip()
        lines += [f"## {title}", "", f"From [notebook {source.stem[:2]}](notebooks/{source.stem}.ipynb).", ""]
        for text in answers:
            body = text.split("\n")
            if body[0].strip() == "## Questions":   # the notebook's own heading, repeated under each title
                body = body[1:]
            lines += ["\n".join(body).strip("\n"), ""]
    return "\n".join(lines).rstrip() + "\n"
