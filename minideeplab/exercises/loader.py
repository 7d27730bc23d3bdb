"""Import a workspace's ``textbook/`` files from their path, under a name of their own.

The grader must run the student's code, never the installed ``minideeplab.textbook``. So each check creates a
fresh package name (``_minideeplab_workspace_<n>_<random>``) whose only search location is ``DIR/textbook``, and
imports every file of it through a finder that answers for that name only: nothing is added to ``sys.path``, the
installed package cannot be picked up, and two workspaces checked in one process never share modules. The files'
own imports of each other (``from .conv import im2col``) resolve inside the copy; their imports of the
infrastructure (``from minideeplab.nn.module import Module``) come from the installed package. The loader compiles
the current text of each file (no bytecode cache is read or written: a file saved within the same second as a
cached copy would otherwise run the old code). The package's ``__init__.py`` is not run: each file is imported on
its own, so a syntax error in one file fails only the exercises that need it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import sys
import traceback
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "textbook"                       # the folder of the workspace that holds the student's layers
MANIFEST = ".minideeplab-exercises.json"    # marks a folder as a workspace
_counter = itertools.count()


class _FreshLoader(importlib.machinery.SourceFileLoader):
    """A source loader that compiles the file's text every time (no ``__pycache__`` read or written)."""

    def get_code(self, fullname):
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


class _WorkspaceFinder(importlib.abc.MetaPathFinder):
    """Finds ``<prefix>.<stem>`` as ``<directory>/<stem>.py``, and nothing else."""

    def __init__(self, prefix: str, directory: Path):
        self.prefix, self.directory = prefix, directory

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.prefix + "."):
            return None
        stem = fullname[len(self.prefix) + 1:]
        file = self.directory / f"{stem}.py"
        if "." in stem or not file.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, file, loader=_FreshLoader(fullname, str(file)))


@dataclass
class Location:
    """A place in a workspace file: ``path`` as the user named the workspace, 1-based ``line``, its text."""
    path: str
    line: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


def workspace_location(exc: BaseException, root: Path, shown_root: str) -> Location | None:
    """The innermost place inside ``root`` where ``exc`` was raised (a syntax error: where it is)."""
    root = root.resolve()

    def shown(filename) -> str | None:
        try:
            rel = Path(filename).resolve().relative_to(root)
        except (ValueError, OSError):
            return None
        return str(Path(shown_root) / rel)

    if isinstance(exc, SyntaxError) and exc.filename and shown(exc.filename):
        return Location(shown(exc.filename), exc.lineno, (exc.text or "").strip())
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if shown(frame.filename):
            found = Location(shown(frame.filename), frame.lineno, (frame.line or "").strip())
    return found


def describe(exc: BaseException, root: Path, shown_root: str) -> str:
    """One line: ``Type: message`` and where in the workspace, with the line's text."""
    if isinstance(exc, SyntaxError):
        text = f"{type(exc).__name__}: {exc.msg}"
    else:
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    where = workspace_location(exc, root, shown_root)
    if where is None:
        return text
    return f"{text} (at {where}{': ' + where.text if where.text else ''})"


# What a workspace file may import besides its own files: the textbook's rule (tests/test_textbook.py), so an
# exercise cannot pass by calling the package's fast layers or the installed solution.
ALLOWED_IMPORTS = {
    "__future__": None, "numpy": None,
    "minideeplab.backend": {"get_array_module"},
    "minideeplab.nn.module": {"Module", "Parameter", "Sequential", "ModuleList", "Identity"},
    "minideeplab.models.config": {"DeepLabConfig", "default_rates"},
}


def forbidden_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, what)`` for every import of ``path`` outside ``ALLOWED_IMPORTS`` (relative imports are the
    workspace's own files); [] when the file does not parse (the import of the file reports that)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name not in ALLOWED_IMPORTS]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            allowed = ALLOWED_IMPORTS.get(node.module, set())
            names = {a.name for a in node.names}
            if node.module not in ALLOWED_IMPORTS or (allowed is not None and not names <= allowed):
                extra = sorted(names - (allowed or set()))
                found.append((node.lineno, f"{node.module}.{'/'.join(extra)}" if extra else node.module))
    return found


@dataclass
class Workspace:
    """The imported files of one workspace. ``module(stem)`` gives ``textbook/<stem>.py`` or raises
    ``ImportError`` with the one-line reason it could not be imported."""
    root: Path
    shown_root: str
    name: str
    modules: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    @property
    def package_dir(self) -> Path:
        return self.root / PACKAGE

    def shown(self, stem: str) -> str:
        return str(Path(self.shown_root) / PACKAGE / f"{stem}.py")

    def module(self, stem: str) -> types.ModuleType:
        if stem in self.errors:
            raise ImportError(self.errors[stem])
        if stem not in self.modules:
            raise ImportError(f"{self.shown(stem)} is missing (run 'minideeplab exercises new' to write a fresh "
                              f"workspace and copy your code over)")
        return self.modules[stem]

    def close(self) -> None:
        for key in [k for k in sys.modules if k == self.name or k.startswith(self.name + ".")]:
            del sys.modules[key]


def load(root: Path, shown_root: str | None = None) -> Workspace:
    """Import every ``root/textbook/*.py`` under a fresh package name (see the module docstring)."""
    root = Path(root)
    ws = Workspace(root, shown_root if shown_root is not None else str(root),
                   f"_minideeplab_workspace_{next(_counter)}_{uuid.uuid4().hex[:8]}")
    directory = ws.package_dir.resolve()
    spec = importlib.machinery.ModuleSpec(ws.name, None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    package = importlib.util.module_from_spec(spec)
    package.__file__ = str(directory / "__init__.py")
    sys.modules[ws.name] = package
    finder = _WorkspaceFinder(ws.name, directory)
    sys.meta_path.insert(0, finder)
    try:
        for file in sorted(directory.glob("*.py")):
            if file.stem == "__init__":
                continue
            try:
                ws.modules[file.stem] = importlib.import_module(f"{ws.name}.{file.stem}")
            except Exception as e:    # a syntax error, a bad import, an error at import time: that file fails
                reason = describe(e, root, ws.shown_root)
                ws.errors[file.stem] = f"{ws.shown(file.stem)} could not be imported: {reason}"
    finally:
        sys.meta_path.remove(finder)
    return ws
