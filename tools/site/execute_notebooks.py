"""Execute the teaching notebooks for the website, and time them.

The notebooks are stored in ``notebooks/`` without outputs. The website shows them *executed*: this module runs
each one with nbclient into ``build/site-notebooks/<mode>/notebooks/`` (``quick`` with ``MINIDEEPLAB_SHORT=1``, ``full``
without) and records in the executed copy a key made of everything its outputs depend on (the notebook, the mode
and every ``.py`` file of the package). A notebook whose key has not changed is not run again, so an incremental
``make docs`` only re-renders. Any cell error stops the run with the notebook's name and the cell's traceback.

The mkdocs hook (``tools/site/hooks.py``) calls :func:`executed_notebook`. From the command line it times the
notebooks, e.g. the full-mode times in ``docs/syllabus.md``::

    OMP_NUM_THREADS=2 python tools/site/execute_notebooks.py --full --force

The kernel imports the package from the checkout being built (``PYTHONPATH`` starts with the repository root), draws
its figures with the inline backend whatever ``MPLBACKEND`` says, and runs in ``notebooks/`` like the tests do.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


class NotebookError(RuntimeError):
    """A notebook is missing, stale or fails to execute; the message says which and why."""


def list_notebooks(root: Path) -> list[Path]:
    """The teaching notebooks ``notebooks/NN_*.ipynb``; each cell file ``notebooks/cells/NN_*.py`` must have one."""
    nb_dir = root / "notebooks"
    notebooks = sorted(nb_dir.glob(NOTEBOOK_GLOB))
    missing = [p.stem for p in sorted((nb_dir / "cells").glob("[0-9][0-9]_*.py"))
               if not (nb_dir / f"{p.stem}.ipynb").exists()]
    if missing:
        raise NotebookError(f"notebooks/cells has {', '.join(missing)} but notebooks/ has no such .ipynb: "
                            "run python notebooks/build_notebooks.py")
    return notebooks


def source_key(root: Path, notebook: Path, short: bool) -> str:
    """A hash of what the executed notebook depends on: its text, the mode and the package's source files."""
    h = hashlib.sha256()
    h.update(b"quick" if short else b"full")
    h.update(notebook.read_bytes())
    package = root / "minideeplab"
    for path in sorted(package.rglob("*.py")) if package.is_dir() else []:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def _kernel_environment(root: Path, short: bool):
    """Environment variables the kernel inherits (nbclient starts it with a copy of ``os.environ``)."""
    saved = dict(os.environ)
    os.environ["MINIDEEPLAB_SHORT"] = "1" if short else "0"
    os.environ["MPLBACKEND"] = INLINE_BACKEND   # an inherited MPLBACKEND=Agg would drop every figure
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [saved.get("PYTHONPATH")])])
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def execute(notebook: Path, target: Path, root: Path, short: bool, timeout: int = 3600) -> float:
    """Run ``notebook`` top to bottom into ``target`` (written atomically); return the wall time in seconds.

    Raises:
        NotebookError: a cell raised; the message names the notebook and carries the cell's traceback.
    """
    import nbclient
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(notebook.parent)}})
    start = time.perf_counter()
    with _kernel_environment(root, short):
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as err:
            raise NotebookError(f"notebook {notebook.name} failed ({'quick' if short else 'full'} mode):\n{err}") from None
        except nbclient.exceptions.CellTimeoutError as err:
            raise NotebookError(f"notebook {notebook.name}: a cell ran longer than {timeout} s:\n{err}") from None
    seconds = time.perf_counter() - start
    nb.metadata["minideeplab_site"] = {"key": source_key(root, notebook, short),
                                       "mode": "quick" if short else "full", "seconds": round(seconds, 1)}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ipynb", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would follow the copy into the site
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return seconds


def cached_key(target: Path) -> str | None:
    """The key stored in an executed notebook, or None when there is none (not built, or unreadable)."""
    import json

    try:
        return json.loads(target.read_text(encoding="utf-8"))["metadata"]["minideeplab_site"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def executed_notebook(root: Path, notebook: Path, short: bool, force: bool = False,
                      log=print) -> tuple[Path, float | None]:
    """The executed copy of ``notebook``, run now unless an up-to-date copy exists.

    Returns:
        (path of the executed copy, wall seconds of this run or None when the cached copy was used)
    """
    target = root / "build" / "site-notebooks" / ("quick" if short else "full") / "notebooks" / notebook.name
    if not force and cached_key(target) == source_key(root, notebook, short):
        return target, None
    log(f"executing {notebook.name} ({'quick' if short else 'full'} mode)")
    seconds = execute(notebook, target, root, short)
    log(f"executed {notebook.name} in {seconds:.1f} s")
    return target, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute (and time) the teaching notebooks for the website.")
    parser.add_argument("names", nargs="*", help="notebook stems, e.g. 01_convolution_and_im2col (default: all)")
    parser.add_argument("--full", action="store_true", help="full mode (default: quick, MINIDEEPLAB_SHORT=1)")
    parser.add_argument("--force", action="store_true", help="run even when the cached copy is up to date")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args(argv)
    root = args.root.resolve()
    try:
        notebooks = list_notebooks(root)
        if args.names:
            unknown = set(args.names) - {p.stem for p in notebooks}
            if unknown:
                raise NotebookError(f"no notebook named {', '.join(sorted(unknown))} in {root / 'notebooks'}")
            notebooks = [p for p in notebooks if p.stem in args.names]
        rows = []
        for nb in notebooks:
            target, seconds = executed_notebook(root, nb, short=not args.full, force=args.force,
                                                log=lambda m: print(m, file=sys.stderr))
            rows.append((nb.stem, seconds))
    except NotebookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"mode {'full' if args.full else 'quick'}, OMP_NUM_THREADS={threads}")
    for stem, seconds in rows:
        print(f"{stem:42s} {'cached' if seconds is None else f'{seconds:8.1f} s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
