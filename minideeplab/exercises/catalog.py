"""The exercises: which textbook functions hold each one's solution regions, what its grader checks.

The solutions themselves live in ``minideeplab/textbook/*.py`` between ``### BEGIN SOLUTION`` and
``### END SOLUTION``; an exercise names the functions whose regions are its own (``Conv2d.backward``). Its hint is
the ``### HINT:`` text of those regions, the same words the student's stub shows.
"""
from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import graders
from .loader import Location
from .regions import Region, find_regions


def textbook_dir() -> Path:
    """The installed ``minideeplab/textbook`` folder: the source of every workspace."""
    from .. import textbook
    return Path(textbook.__file__).resolve().parent


def function_spans(text: str) -> dict[str, tuple[int, int]]:
    """``{qualname: (first line, last line)}`` of every function of a module (``Conv2d.backward``, ``im2col``)."""
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    spans[name] = (child.lineno, child.end_lineno)
                visit(child, name + ".")
    visit(ast.parse(text), "")
    return spans


def regions_by_function(text: str, where: str) -> dict[str, list[Region]]:
    """The regions of a module, keyed by the innermost function that holds each; ``ValueError`` for a region
    outside any function."""
    spans = function_spans(text)
    out: dict[str, list[Region]] = {}
    for region in find_regions(text, where):
        holders = [(start, name) for name, (start, end) in spans.items() if start < region.begin <= end]
        if not holders:
            raise ValueError(f"{where}:{region.begin}: a solution region must sit inside a function body")
        out.setdefault(max(holders)[1], []).append(region)
    return out


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    file: str                   # in textbook/
    functions: tuple            # qualnames whose regions belong to this exercise
    checks: str                 # what the grader checks, in one sentence
    week: int
    grade: Callable

    @property
    def stem(self) -> str:
        return self.file[:-3]

    @property
    def hint(self) -> str:
        """The hints of its regions (labelled by function when there are several functions)."""
        hints = _hints()[self.name]
        if len(hints) == 1:
            return next(iter(hints.values()))
        short = [f.split(".")[-1] for f in hints]
        labels = short if len(set(short)) == len(short) else list(hints)
        return " ".join(f"{label}: {h}" + ("" if h.endswith(".") else ".") for label, h in zip(labels, hints.values()))

    def hint_at(self, workspace, location) -> str:
        """The hint of the function that holds ``location`` (a line of the workspace file), else ``hint``."""
        try:
            spans = function_spans((workspace.package_dir / self.file).read_text())
        except (OSError, SyntaxError, ValueError):
            return self.hint
        for f in self.functions:
            start, end = spans.get(f, (0, -1))
            if location is not None and location.line and start <= location.line <= end:
                return _hints()[self.name].get(f) or self.hint
        return self.hint

    def location(self, workspace) -> Location:
        """Where the exercise starts in the workspace: the ``def`` line of its first function."""
        shown = workspace.shown(self.stem)
        try:
            spans = function_spans((workspace.package_dir / self.file).read_text())
        except (OSError, SyntaxError, ValueError):
            return Location(shown)
        first = spans.get(self.functions[0])
        return Location(shown, first[0]) if first else Location(shown)


EXERCISES = (
    Exercise("relu", "ReLU backward", "activation.py", ("ReLU.backward",),
             "dx against finite differences and the fast ReLU, at inputs away from the kink; dout left unchanged", 1,
             graders.relu),
    Exercise("sigmoid", "Sigmoid forward and backward", "activation.py", ("Sigmoid.forward", "Sigmoid.backward"),
             "out and dx against finite differences and the fast Sigmoid, also at saturated inputs (|x| up to 60)", 1,
             graders.sigmoid),
    Exercise("im2col", "im2col", "conv.py", ("im2col",),
             "the columns against the fast im2col on four geometries (stride, padding, dilation, rectangular "
             "kernels), and their adjoint (central differences of <im2col(x), c> against col2im(c))", 1,
             graders.im2col),
    Exercise("col2im", "col2im", "conv.py", ("col2im",),
             "col2im(c) against the fast col2im and against central differences of <im2col(x), c>, on four "
             "geometries; overlapping windows must add up", 1, graders.col2im),
    Exercise("conv_backward", "Conv2d backward", "conv.py", ("Conv2d.backward",),
             "dx, weight.grad and bias.grad against finite differences and the fast Conv2d on four geometries "
             "(with the solution's im2col/col2im); gradients added into .grad", 1, graders.conv_backward),
    Exercise("batchnorm_backward", "BatchNorm2d backward", "norm.py", ("BatchNorm2d.backward",),
             "dx, weight.grad, bias.grad in training mode (through the batch mean and variance), in eval mode, and "
             "without affine parameters, against finite differences and the fast BatchNorm2d", 1,
             graders.batchnorm_backward),
    Exercise("maxpool_backward", "MaxPool2d backward", "pool.py", ("MaxPool2d.backward",),
             "dx against finite differences and the fast MaxPool2d (padding 1, overlapping windows), and with tied "
             "maxima (the first tap wins)", 1, graders.maxpool_backward),
    Exercise("avgpool_backward", "AvgPool2d and global average pool backward", "pool.py",
             ("AvgPool2d.backward", "AdaptiveAvgPool2d.backward"),
             "dx of AvgPool2d (two geometries) and AdaptiveAvgPool2d against finite differences and the fast layers",
             2, graders.avgpool_backward),
    Exercise("upsample_backward", "bilinear Upsample backward", "resize.py", ("Upsample.backward",),
             "dx against finite differences and the fast Upsample: up, down, a scale factor, align_corners", 2,
             graders.upsample_backward),
    Exercise("dense_block_backward", "DenseBlock backward (the sum at the concatenation)", "densenet.py",
             ("DenseBlock.backward",),
             "dx and every parameter gradient of a 3-layer block (the solution's DenseLayers) against finite "
             "differences and the fast DenseBlock; the identity path of the concatenation", 2,
             graders.dense_block_backward),
    Exercise("aspp_fork_join", "ASPP forward and backward (the fork and the join)", "deeplab.py",
             ("ASPP.forward", "ASPP.backward"),
             "out, dx and every parameter gradient of an ASPP (the solution's branches) against finite differences "
             "and the fast ASPP; dx is the sum over the five branches", 2, graders.aspp_fork_join),
    Exercise("bce_grad", "BCE-with-logits gradient", "loss.py", ("BCEWithLogitsLoss.backward",),
             "dL/dlogits for reductions mean, sum, none and a pos_weight, against finite differences and the fast "
             "loss, also at saturated logits (|x| ~ 30)", 3, graders.bce_grad),
    Exercise("dice_grad", "Dice gradient", "loss.py", ("DiceLoss.backward",),
             "dL/dlogits of the batch Dice and the per-image Dice against finite differences and the fast loss", 3,
             graders.dice_grad),
)
BY_NAME = {e.name: e for e in EXERCISES}


@functools.lru_cache(maxsize=1)
def _hints() -> dict:
    """Each exercise's hint: the ``### HINT:`` text of its regions in the installed textbook."""
    hints = {}
    for e in EXERCISES:
        path = textbook_dir() / e.file
        regions = regions_by_function(path.read_text(), str(path))
        hints[e.name] = {f: " ".join(r.hint for r in regions.get(f, []) if r.hint) for f in e.functions}
    return hints


def exercise_of(file: str, function: str) -> Exercise | None:
    """The exercise a region inside ``function`` of ``textbook/<file>`` belongs to."""
    for e in EXERCISES:
        if e.file == file and function in e.functions:
            return e
    return None
