"""MkDocs hooks that put the executed notebooks and the source pages into the website (see docs/website.md).

- **Notebooks**: every ``notebooks/NN_*.ipynb`` is executed (``execute_notebooks.py``, cached on its inputs) and
  added to the site as ``notebooks/NN_*.ipynb``, which mkdocs-jupyter renders with its outputs. Quick mode when
  ``MINIDEEPLAB_SHORT=1`` (what ``make docs`` and CI use), full mode otherwise. A cell error aborts the build.
  Nothing is copied into ``docs/``: the notebooks stay where they are, without outputs, in git.
- **Source pages**: a nav entry ``source/<path>.md`` becomes a page that shows the repository file ``<path>.py``
  in full, highlighted, with linkable line numbers. One nav line per file, e.g. for a textbook layer
  ``- conv.py: source/minideeplab/textbook/conv.md``. A nav entry whose ``.py`` does not exist stays a missing
  page, which the strict build reports.
- **Answers**: the site renders a copy of each executed notebook in which the written questions' answers are folded
  in collapsed ``<details>`` blocks and the code solutions marked (``answers.py``); a nav entry ``questions.md``
  (with no such file in ``docs/``) becomes the page of every notebook's written questions, answers folded.
- **MathJax** for the notebooks' formulas is copied from the ``jupyter-server-mathjax`` package into
  ``assets/mathjax/``, so the site needs no network to build or to view.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from answers import StaleNotebook, questions_page, site_notebook
from execute_notebooks import NotebookError, executed_notebook, list_notebooks
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.minideeplab")
SOURCE_PAGE = re.compile(r"^source/(?P<path>.+)\.md$")
QUESTIONS_PAGE = "questions.md"


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _short() -> bool:
    import os

    return os.environ.get("MINIDEEPLAB_SHORT") == "1"


def _nav_paths(nav) -> list[str]:
    """Every page path in the nav (a nested list of strings and one-key dicts)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_paths(value)]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_paths(item)]
    return []


def source_page(rel_path: str, text: str) -> str:
    """Markdown for a page showing the file ``rel_path`` (its ``text``) in one highlighted code block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return ("---\nhide:\n  - toc\n---\n\n"   # a page with one heading needs no table of contents: more room for code
            f"# `{rel_path}`\n\n"
            f"The file `{rel_path}` of the checkout this site was built from, in full. "
            "Click a line number to get a link to that line.\n\n"
            + (_solutions_note("../" * (rel_path.count("/") + 1)) if "### BEGIN SOLUTION" in text else "") +
            f'{fence}python linenums="1"\n{text.rstrip()}\n{fence}\n')


def _solutions_note(to_docs: str) -> str:
    return ("The lines between `### BEGIN SOLUTION` and `### END SOLUTION` are the solutions of the "
            f"[exercises]({to_docs}exercises.md): a student's workspace (`minideeplab exercises new DIR`) has a stub "
            "there. To try an exercise first, work in a workspace before reading on.\n\n")


@event_priority(100)   # before mkdocs-jupyter's on_files, which turns the .ipynb files into pages
def on_files(files: Files, config) -> Files:
    root = _root(config)
    short = _short()
    try:
        notebooks, ran = list_notebooks(root), 0
        for nb in notebooks:
            executed, seconds = executed_notebook(root, nb, short, log=log.info)
            ran += seconds is not None
            # the page shows a copy with the written answers folded (answers.py), not the executed copy itself
            shown = site_notebook(root, executed, executed.parents[2] / f"{executed.parents[1].name}-site"
                                  / "notebooks" / nb.name)
            # A File whose src_dir holds notebooks/NN.ipynb (not File.generated: mkdocs-jupyter's wrapper
            # loses a generated file's abs_src_path)
            files.append(File(f"notebooks/{nb.name}", src_dir=str(shown.parents[1]),
                              dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    except (NotebookError, StaleNotebook) as err:
        raise PluginError(str(err)) from None
    log.info("notebooks: %d in %s mode, %d executed now, %d unchanged since their last run",
             len(notebooks), "quick" if short else "full", ran, len(notebooks) - ran)
    for nav_path in _nav_paths(config.nav):
        match = SOURCE_PAGE.match(nav_path)
        source = root / f"{match['path']}.py" if match else None
        if source is not None and source.is_file() and files.get_file_from_path(nav_path) is None:
            rel = source.relative_to(root).as_posix()
            files.append(File.generated(config, nav_path, content=source_page(rel, source.read_text(encoding="utf-8"))))
    if QUESTIONS_PAGE in _nav_paths(config.nav) and files.get_file_from_path(QUESTIONS_PAGE) is None:
        files.append(File.generated(config, QUESTIONS_PAGE, content=questions_page(root)))
    return files


def on_post_build(config) -> None:
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise PluginError("jupyter-server-mathjax is not installed (pip install -e '.[docs]'): "
                          "the notebook pages load MathJax from assets/mathjax/") from None
    static = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"
    shutil.copytree(static, Path(config.site_dir) / "assets" / "mathjax", dirs_exist_ok=True)
