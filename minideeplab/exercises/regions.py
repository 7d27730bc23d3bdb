"""Solution regions (nbgrader's convention) and the two versions written from them.

A region is a run of lines between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (each alone on its line, any
indentation), optionally starting with ``### HINT: ...`` lines. The textbook keeps them inside function bodies; the
notebook sources (``notebooks/cells/*.py``) keep them in code cells (code to write) and markdown cells (answers to
the written questions; there the lines read ``# ### BEGIN SOLUTION`` in the percent-format source).

* The **instructor** version keeps every solution; ``drop_markers`` removes the marker and hint lines (notebooks),
  the textbook copy keeps them so the key shows where each exercise is.
* The **student** version replaces each region by a stub: the hint as comments and
  ``raise NotImplementedError(...)`` (code), or an answer placeholder (markdown).
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"
STUB_MARK = "# YOUR CODE HERE"
ANSWER_PLACEHOLDER = "**Your answer:** *(write it here)*"


def is_marker(line: str) -> bool:
    """Whether ``line`` is a region marker or hint line (not code: the textbook's line counts skip them)."""
    s = line.strip()
    return s == BEGIN or s == END or s.startswith(HINT)


@dataclass
class Region:
    """Lines ``begin``..``end`` (1-based, the marker lines included) of a text, with its hint and indentation."""
    begin: int
    end: int
    indent: str
    hint: str


def find_regions(text: str, where: str = "<text>") -> list[Region]:
    """Every solution region of ``text``; ``ValueError`` naming ``where`` and the line for unbalanced markers."""
    regions, open_at, indent, hints = [], None, "", []
    for number, line in enumerate(text.split("\n"), start=1):
        s = line.strip()
        if s == BEGIN:
            if open_at is not None:
                raise ValueError(f"{where}:{number}: '{BEGIN}' inside the region opened at line {open_at}")
            open_at, indent, hints = number, line[:len(line) - len(line.lstrip())], []
        elif s == END:
            if open_at is None:
                raise ValueError(f"{where}:{number}: '{END}' without '{BEGIN}'")
            regions.append(Region(open_at, number, indent, " ".join(hints)))
            open_at = None
        elif s.startswith(HINT):
            if open_at is None or number != open_at + 1 + len(hints):
                raise ValueError(f"{where}:{number}: a '{HINT}' line belongs right after '{BEGIN}'")
            hints.append(s[len(HINT):].strip())
    if open_at is not None:
        raise ValueError(f"{where}:{open_at}: '{BEGIN}' without '{END}'")
    return regions


def _replace(text: str, where: str, replacement) -> str:
    lines = text.split("\n")
    for region in reversed(find_regions(text, where)):
        lines[region.begin - 1:region.end] = replacement(region, lines[region.begin:region.end - 1])
    return "\n".join(lines)


def drop_markers(text: str, where: str = "<text>") -> str:
    """The instructor's version: the solutions in place, the marker and hint lines removed."""
    return _replace(text, where, lambda region, body: [line for line in body if not is_marker(line)])


def code_stub(region: Region, label: str, width: int = 110) -> list[str]:
    """The student's lines for a code region: a header, the hint as comments, a ``NotImplementedError``."""
    ind = region.indent
    lines = [f"{ind}{STUB_MARK}{f' ({label})' if label else ''}"]
    if region.hint:
        lines += textwrap.wrap(region.hint, width=max(40, width - len(ind)), initial_indent=f"{ind}# Hint: ",
                               subsequent_indent=f"{ind}#   ")
    message = f"{label}: not written yet" if label else "not written yet"
    lines.append(f"{ind}raise NotImplementedError({message + ' (see the hint above)'!r})")
    return lines


def student_code(text: str, where: str = "<text>", label=None) -> str:
    """``text`` with every region replaced by a ``code_stub``; ``label(region)`` names its exercise (or None)."""
    return _replace(text, where, lambda region, body: code_stub(region, label(region) if label else ""))


def student_markdown(text: str, where: str = "<text>") -> str:
    """A markdown text with every region (an answer) replaced by the placeholder (and its hint, if any)."""
    def stub(region, body):
        return [ANSWER_PLACEHOLDER] + ([f"*Hint: {region.hint}*"] if region.hint else [])
    return _replace(text, where, stub)


_PARENT_IMPORT = re.compile(r"^from \.\.(\w[\w.]*)? import ", re.MULTILINE)


def absolute_imports(text: str, package: str = "minideeplab") -> str:
    """``from ..nn.module import X`` -> ``from minideeplab.nn.module import X``: a copy of ``minideeplab.textbook``
    outside the package imports the infrastructure (Module, backend) from the installed package; its imports of
    its own files (``from .conv import ...``) stay relative, so they resolve inside the copy."""
    return _PARENT_IMPORT.sub(lambda m: f"from {package}{'.' + m.group(1) if m.group(1) else ''} import ", text)
