"""``exercises new``: write a workspace; ``exercises check``: grade one; the table and JSON reports.

A workspace ``DIR`` holds

* ``textbook/``: a copy of ``minideeplab.textbook`` (the student's layers), every solution region replaced by a stub
  that raises ``NotImplementedError`` with its hint, or, with ``--with-solutions``, the solutions in place;
* ``NN_name.ipynb``: the six notebooks, their code regions stubbed and their written questions without answers
  (student), or complete (instructor); they ``import textbook``, the workspace's own copy (Jupyter starts the
  kernel in ``DIR``, whose folder is first on the kernel's path);
* ``QUESTIONS.md`` (the written questions of every notebook), ``README.md`` and ``.minideeplab-exercises.json``.
"""
from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path

from ..io import atomic_write
from .catalog import BY_NAME, EXERCISES, exercise_of, regions_by_function, textbook_dir
from .grading import Result, grade
from .loader import MANIFEST, PACKAGE, load
from .notebook import cell_sources_dir, has_regions, notebook_json, parse_cells, versioned_cells
from .regions import absolute_imports, student_code

TEXTBOOK_IMPORT = re.compile(r"^from minideeplab import textbook$", re.MULTILINE)


def student_textbook(text: str, file: str) -> str:
    """A textbook file with each region replaced by a stub labelled with its exercise."""
    labels = {}
    for function, regions in regions_by_function(text, file).items():
        exercise = exercise_of(file, function)
        if exercise is None:
            raise ValueError(f"textbook/{file}: a solution region in {function} belongs to no exercise "
                             f"(minideeplab/exercises/catalog.py)")
        labels.update({r.begin: f"exercise {exercise.name}" for r in regions})
    return student_code(text, f"textbook/{file}", label=lambda region: labels[region.begin])


def _workspace_cells(source: Path, version: str) -> list[tuple[str, str]]:
    cells = versioned_cells(source.read_text(), version, str(source))
    own = "import textbook  # this workspace's textbook/: your layers"
    return [(kind, TEXTBOOK_IMPORT.sub(own, src) if kind == "code" else src) for kind, src in cells]


def _questions(cells_dir: Path | None, version: str) -> str:
    lines = ["# Written questions", ""]
    if version == "student":
        lines += ["Answer in the notebooks (the *Your answer* cells) or here. The instructor's version of this file "
                  "has the answers.", ""]
    for source in sorted(cells_dir.glob("[0-9][0-9]_*.py")) if cells_dir else ():
        raw = parse_cells(source.read_text())
        title = raw[0][1].split("\n")[0].lstrip("# ").strip() if raw else source.stem
        chosen = [src for (kind, src), (_, original) in zip(_workspace_cells(source, version), raw)
                  if kind == "markdown" and has_regions(original)]
        if chosen:
            lines += [f"## {title} ({source.stem}.ipynb)", ""] + [c + "\n" for c in chosen]
    return "\n".join(lines).rstrip() + "\n"


def _readme(version: str, notebooks: list[str], directory: str) -> str:
    rows = "\n".join(f"| `{e.name}` | {e.week} | `textbook/{e.file}` | {', '.join(f'`{f}`' for f in e.functions)} | "
                     f"{e.checks} |" for e in EXERCISES)
    if version == "student":
        intro = ("This is your exercise workspace for minideeplab. `textbook/` is a copy of the package's textbook "
                 "layers in which the parts you write are stubs: each starts with `# YOUR CODE HERE (exercise "
                 "NAME)`, shows a hint, and raises `NotImplementedError` until you replace it. The docstrings above "
                 "each stub, the notebooks and docs/derivations.md of the project give the math.")
    else:
        intro = ("This is the instructor's version (written with `--with-solutions`): the solutions sit in "
                 "`textbook/` between `### BEGIN SOLUTION` and `### END SOLUTION`, the notebooks and QUESTIONS.md "
                 "hold the answers to the written questions. `minideeplab exercises check` passes every exercise "
                 "here; a student workspace comes from `minideeplab exercises new DIR` without the flag.")
    nb = (f"The notebooks ({', '.join(notebooks)}) `import textbook`, this workspace's copy: start Jupyter in this "
          f"folder (`jupyter lab`), and restart the kernel after you edit a file in `textbook/`. A notebook runs "
          f"to the end once the exercises it uses are done; its own small code exercises are marked `# YOUR CODE "
          f"HERE`, and its written questions are at its end (all of them also in QUESTIONS.md)."
          if notebooks else "No notebooks were written: this installation has no notebook sources (see "
          "docs/exercises.md, 'Where the sources live').")
    return f"""# minideeplab exercises ({version}'s version)

{intro}

## The exercises

| exercise | week | file | function(s) | what `check` tests |
|---|---|---|---|---|
{rows}

## Checking your work

    minideeplab exercises check {directory}                      # every exercise
    minideeplab exercises check {directory} --only conv_backward # one exercise (--only a,b for several)

For each exercise `check` prints pass or FAIL, the worst relative error of your gradients against central finite
differences and against the solution (the package's own layers), the tensor that is wrong (`dx`, `weight.grad`,
...), where the exercise is in your file, and a hint for a failure. The exit code is 0 only when every exercise
passes. `check` grades the files in `{directory}/{PACKAGE}/`, never the installed package. Each exercise is graded on
its own: where your code calls another exercise's function (`col2im` inside `MaxPool2d.backward`), the check uses
the solution's, so one unfinished exercise does not fail the others. `--json REPORT.json` writes the full report.

## Notebooks and written questions

{nb}
"""


def new_workspace(directory, with_solutions: bool = False, force: bool = False) -> dict:
    """Write a student workspace (or the instructor's, ``with_solutions``) into ``directory``; refuses a non-empty
    folder unless ``force`` (which rewrites the workspace's own files and leaves any other file alone)."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{directory} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ValueError(f"{directory} is not empty; choose a new folder, or pass --force to overwrite the workspace "
                         f"files in it (your edits in {directory}/{PACKAGE}/ would be lost)")
    version = "instructor" if with_solutions else "student"
    files = {}
    for source in sorted(textbook_dir().glob("*.py")):
        text = source.read_text()
        if version == "student":
            text = student_textbook(text, source.name)
        files[f"{PACKAGE}/{source.name}"] = absolute_imports(text)
    cells_dir = cell_sources_dir()
    notebooks = []
    for source in sorted(cells_dir.glob("[0-9][0-9]_*.py")) if cells_dir else ():
        files[f"{source.stem}.ipynb"] = notebook_json(_workspace_cells(source, version), source.stem[:2])
        notebooks.append(f"{source.stem}.ipynb")
    files["QUESTIONS.md"] = _questions(cells_dir, version)
    files["README.md"] = _readme(version, notebooks, str(directory))
    from .. import __version__
    files[MANIFEST] = json.dumps({"format": 1, "version": version, "package": PACKAGE, "minideeplab": __version__,
                                  "exercises": [e.name for e in EXERCISES], "notebooks": notebooks}, indent=1) + "\n"
    for rel, text in files.items():
        with atomic_write(root / rel, "w", encoding="utf-8") as f:
            f.write(text)
    return {"version": version, "files": sorted(files), "notebooks": notebooks}


def resolve_only(only) -> list[str]:
    """Exercise names from ``--only`` values (each may be a comma-separated list); ``ValueError`` for unknown."""
    if not only:
        return [e.name for e in EXERCISES]
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown exercise {', '.join(map(repr, unknown))}; the exercises are: "
                         f"{', '.join(e.name for e in EXERCISES)}")
    return list(dict.fromkeys(names))


def check_workspace(directory, only=None) -> list[Result]:
    """Grade the workspace in ``directory`` (all exercises, or the names in ``only``)."""
    root = Path(directory)
    if not root.exists():
        raise ValueError(f"{directory}: no such folder (create a workspace with 'minideeplab exercises new "
                         f"{directory}')")
    if not root.is_dir():
        raise ValueError(f"{directory} is not a folder")
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{directory} is not an exercises workspace (no {MANIFEST} in it); create one with "
                         f"'minideeplab exercises new DIR'")
    if not (root / PACKAGE).is_dir():
        raise ValueError(f"{directory}/{PACKAGE}/ is missing: the workspace has no code to check")
    names = resolve_only(only)
    ws = load(root, shown_root=str(directory))
    try:
        return [grade(ws, BY_NAME[name]) for name in names]
    finally:
        ws.close()


def _err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_report(results: list[Result], directory, seconds: float, width: int = 110) -> str:
    """The table: one line per exercise; under a failed one, where it is and the hint."""
    head = f"{'exercise':<21} {'result':<6}  {'vs finite diff':>14}  {'vs solution':>11}  wrong tensor"
    lines = [f"minideeplab exercises check {directory}", "", head, "-" * len(head)]
    for r in results:
        wrong = ", ".join(r.wrong[:2]) + (f" (+{len(r.wrong) - 2} more)" if len(r.wrong) > 2 else "")
        lines.append(f"{r.name:<21} {'pass' if r.passed else 'FAIL':<6}  {_err(r.fd_error):>14}  "
                     f"{_err(r.ref_error):>11}  {wrong or ('-' if r.passed else '(an error)')}")
        if not r.passed:
            lines.append(f"    in:   {r.where}")
            lines += textwrap.wrap(r.hint, width=width, initial_indent="    hint: ", subsequent_indent="          ")
    passed = sum(r.passed for r in results)
    lines += ["", f"{passed} of {len(results)} exercises pass ({seconds:.1f} s)."
              + ("" if passed == len(results) else " Exit code 1.")]
    return "\n".join(lines)


def json_report(results: list[Result], directory, seconds: float) -> str:
    return json.dumps({"workspace": str(Path(directory).resolve()), "seconds": round(seconds, 3),
                       "passed": sum(r.passed for r in results), "total": len(results),
                       "all_passed": all(r.passed for r in results),
                       "exercises": [r.to_dict() for r in results], "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                      indent=1, default=float) + "\n"
