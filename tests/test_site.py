"""The website's build is strict: each kind of defect fails it on its own, and a clean tiny site builds.

Every case builds a tiny site (two pages, one small notebook) with the project's own mkdocs.yml settings (strict,
validation, mkdocs-jupyter, tools/site/hooks.py) and one planted defect. The cases share one root folder, so the
good notebook runs once and the later builds take it from the hooks' cache. The real site is ``make docs``.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocs_jupyter")
pytest.importorskip("jupyter_server_mathjax")
nbformat = pytest.importorskip("nbformat")
yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
GOOD_CELL = ("import matplotlib.pyplot as plt\n"
             "plt.plot([0, 1], [1, 0])\n"
             "plt.show()\n"
             "print('answer', 6 * 7)")


def _notebook(path: Path, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"), nbformat.v4.new_code_cell(source)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    _notebook(root / "notebooks" / "01_good.ipynb", GOOD_CELL)
    (root / "pkg").mkdir()
    (root / "pkg" / "layer.py").write_text('def relu(x):\n    """max(x, 0)."""\n    return x * (x > 0)\n')
    return root


def build(root: Path, name: str, pages: dict, nav: list, notebooks: dict | None = None):
    """Build a site named ``name`` under ``root`` with the repository's mkdocs.yml settings; return the process."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    docs = root / f"docs_{name}"
    for page, text in pages.items():
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        (docs / page).write_text(text)
    for nb_name, source in (notebooks or {}).items():
        _notebook(root / "notebooks" / nb_name, source)
    jupyter = next(p for p in config["plugins"] if isinstance(p, dict) and "mkdocs-jupyter" in p)
    jupyter["mkdocs-jupyter"]["cache_dir"] = str(root / "build" / f"jupyter-cache-{name}")
    config.update(docs_dir=str(docs), site_dir=str(root / "build" / f"site_{name}"), nav=nav,
                  hooks=[str(REPO / "tools" / "site" / "hooks.py")], plugins=[jupyter])   # no API pages here
    config_file = root / f"mkdocs_{name}.yml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "MINIDEEPLAB_SHORT": "1", "NO_MKDOCS_2_WARNING": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=root)
    finally:
        for nb_name in notebooks or {}:
            (root / "notebooks" / nb_name).unlink()


def _warnings(log: str) -> str:
    """The WARNING lines of a build log, each with its indented continuation lines (e.g. the list of pages)."""
    kept, inside = [], False
    for line in log.splitlines():
        inside = line.startswith("WARNING") or (inside and line.startswith(" "))
        if inside:
            kept.append(line)
    return "\n".join(kept)


PAGES = {"index.md": "# Home\n\nSee [the other page](other.md#a-section).\n",
         "other.md": "# Other\n\n## A section\n\nText.\n"}
NAV = [{"Home": "index.md"}, {"Other": "other.md"}, {"Notebook": "notebooks/01_good.ipynb"}]


def test_the_tiny_site_builds_with_the_notebook_executed(root):
    # an experiment's results page needs no nav line (mkdocs.yml's not_in_nav): it builds, and strict mode is content
    pages = {**PAGES, "experiments/demo/summary.md": "# demo\n\nmean 0.5 ± 0.1 over 3 seeds\n"}
    proc = build(root, "good", pages, NAV + [{"layer.py": "source/pkg/layer.md"}])
    assert proc.returncode == 0, proc.stderr
    assert "mean 0.5" in (root / "build" / "site_good" / "experiments" / "demo" / "summary" / "index.html").read_text()
    html = (root / "build" / "site_good" / "notebooks" / "01_good" / "index.html").read_text()
    assert "answer 42" in html                      # the cell ran: its output is on the page
    assert 'src="data:image/png;base64,' in html    # and so is its figure
    source = (root / "build" / "site_good" / "source" / "pkg" / "layer" / "index.html").read_text()
    assert "max(x, 0)." in source and "pkg/layer.py" in source
    assert (root / "build" / "site_good" / "assets" / "mathjax" / "MathJax.js").is_file()


def test_each_link_and_nav_defect_is_reported_and_fails_the_strict_build(root):
    """Six defects planted in one build: each must be reported as a WARNING, which strict mode turns into failure."""
    pages = {**PAGES,
             "index.md": "# Home\n\nSee [nothing](missing.md) and [it](other.md#no-such-heading).\n",
             "orphan.md": "# A page that is not in the nav\n",
             # only experiments/<name>/summary.md may stay out of the nav, not any page under experiments/
             "experiments/notes.md": "# Notes\n", "experiments/demo/extra.md": "# Extra\n"}
    nav = NAV + [{"Gone": "notebooks/02_gone.ipynb"}, {"gone.py": "source/pkg/gone.md"}]
    proc = build(root, "defects", pages, nav, notebooks={"03_extra.ipynb": "print('extra')"})
    assert proc.returncode != 0
    warnings = _warnings(proc.stderr)
    assert "'missing.md'" in warnings and "not found" in warnings             # a broken link
    assert "'#no-such-heading'" in warnings                                    # a broken anchor
    assert "orphan.md" in warnings                                             # a page missing from the nav
    assert "experiments/notes.md" in warnings and "experiments/demo/extra.md" in warnings
    assert "notebooks/03_extra.ipynb" in warnings                              # a notebook missing from the nav
    assert "'notebooks/02_gone.ipynb'" in warnings                             # a nav notebook that does not exist
    assert "'source/pkg/gone.md'" in warnings                                  # a source page for a missing .py
    assert "in strict mode" in proc.stdout + proc.stderr


def test_a_cell_error_fails_the_build(root):
    proc = build(root, "error", PAGES, NAV + [{"Bad": "notebooks/02_bad.ipynb"}],
                 notebooks={"02_bad.ipynb": "raise ValueError('planted cell error')"})
    assert proc.returncode != 0
    assert "02_bad.ipynb" in proc.stderr and "planted cell error" in proc.stderr
    assert not (root / "build" / "site_error" / "index.html").exists()


def test_a_cell_file_without_its_notebook_is_reported(tmp_path):
    sys.path.insert(0, str(REPO / "tools" / "site"))
    try:
        from execute_notebooks import NotebookError, list_notebooks
    finally:
        sys.path.remove(str(REPO / "tools" / "site"))
    (tmp_path / "notebooks" / "cells").mkdir(parents=True)
    (tmp_path / "notebooks" / "cells" / "01_new.py").write_text("# %%\nprint(1)\n")
    with pytest.raises(NotebookError, match="01_new.*build_notebooks.py"):
        list_notebooks(tmp_path)
    _notebook(tmp_path / "notebooks" / "01_new.ipynb", "print(1)")
    assert [p.name for p in list_notebooks(tmp_path)] == ["01_new.ipynb"]


QA_CELLS = """# %% [markdown]
# # A notebook with a question
# %%
x = 20
### BEGIN SOLUTION
### HINT: add one to x
y = x + 1
### END SOLUTION
print('y is', y)
# %% [markdown]
# ## Questions
#
# **Q1.** What is y, in a formula?
#
# ### BEGIN SOLUTION
# **Answer.** It is $x + 1 = 21$, the planted answer.
# ### END SOLUTION
"""


def test_the_site_folds_the_written_answers_and_leaves_the_notebook_alone(tmp_path):
    from minideeplab.exercises.notebook import notebook_json, versioned_cells

    (tmp_path / "notebooks" / "cells").mkdir(parents=True)
    (tmp_path / "notebooks" / "cells" / "01_qa.py").write_text(QA_CELLS)
    stored = notebook_json(versioned_cells(QA_CELLS, "instructor"), "01")   # what build_notebooks.py writes
    (tmp_path / "notebooks" / "01_qa.ipynb").write_text(stored)
    pages = {"index.md": "# Home\n", "exercises.md": "# Exercises\n"}   # the questions page links the exercises
    nav = [{"Home": "index.md"}, {"Exercises": "exercises.md"}, {"QA": "notebooks/01_qa.ipynb"},
           {"Questions": "questions.md"}]
    proc = build(tmp_path, "qa", pages, nav)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "notebooks" / "01_qa.ipynb").read_text() == stored   # git's notebook is not touched

    site = tmp_path / "build" / "site_qa"
    html = (site / "notebooks" / "01_qa" / "index.html").read_text()
    question, folded = html.split("What is y")[1].split('<details class="tip answer">')
    assert "planted answer" not in question                # the answer comes after the fold, not before it
    assert "planted answer" in folded.split("</details>")[0]
    assert "y is 21" in html                               # the solution's code ran, and stays on the page...
    assert "a student&#39;s notebook" in html or "a student's notebook" in html   # ...marked as a solution
    page = (site / "questions" / "index.html").read_text()
    assert "What is y" in page and "planted answer" in page.split('<details class="tip">')[1].split("</details>")[0]
    assert 'class="arithmatex"' in page                    # the formula is left to MathJax, not to Markdown

    # a notebook that is not what its cell source builds (edited by hand, or not rebuilt) fails the build
    (tmp_path / "notebooks" / "01_qa.ipynb").write_text(stored.replace("planted answer", "edited answer"))
    proc = build(tmp_path, "qa_stale", pages, nav)
    assert proc.returncode != 0
    assert "01_qa.ipynb" in proc.stderr and "build_notebooks.py" in proc.stderr


def test_every_notebook_is_what_its_cell_source_builds():
    """The site rewrites each notebook cell by cell from notebooks/cells (answers folded), so a notebook edited by
    hand or not rebuilt fails ``make docs``; this says so earlier, in ``make test``."""
    from minideeplab.exercises.notebook import notebook_json, versioned_cells

    sources = sorted((REPO / "notebooks" / "cells").glob("[0-9][0-9]_*.py"))
    assert sources
    stale = [s.stem for s in sources
             if (REPO / "notebooks" / f"{s.stem}.ipynb").read_text(encoding="utf-8")
             != notebook_json(versioned_cells(s.read_text(encoding="utf-8"), "instructor", str(s)), s.stem[:2])]
    assert not stale, f"run python notebooks/build_notebooks.py: {stale} differ from their notebooks/cells source"
