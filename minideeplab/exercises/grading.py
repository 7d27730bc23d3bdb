"""The grading engine: per exercise, the student's code against central differences and against the solution.

An exercise function gets a ``Grader`` and runs *cases* on the student's layers (``layer_case``) or functions
(``compare`` + ``fd``). Each case records, per tensor (``dx``, ``weight.grad``, ``cols``, ...), the worst relative
error against central differences (``minideeplab.gradcheck``, float64) and against the reference, the package's fast
layers (``minideeplab.nn``, ``minideeplab.losses``, ``minideeplab.models``), which the test suite ties to the
textbook to float64 rounding. An exercise passes when every tensor is within ``RTOL_FD`` of the finite differences
and ``RTOL_REF`` of the reference and nothing else went wrong (``dout`` modified, ``.grad`` overwritten).

The hint: a probe of the exercise that recognises a mistake by its pattern (``Grader.suggest``) wins; otherwise the
generic reading of the worst tensor (a constant factor, a flipped sign, zeros, a wrong shape) followed by the
exercise's own hint (the ``### HINT:`` of its regions). An exception is a failed exercise with its message and its
place in the workspace; ``NotImplementedError`` reads "not done yet: write the region in FILE:LINE".
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from ..gradcheck import check_function, check_module
from .loader import describe, forbidden_imports, workspace_location

RTOL_FD = 1e-5     # analytic vs central differences, float64 (the solutions reach 4e-7; a bug gives 1e-2 or more)
RTOL_REF = 1e-8    # student vs the package's fast layers, max |a - b| / max |b|, float64
INPUTS = ("dx", "dlogits", "cols", "out")
TIMEOUT_S = 60     # per exercise (where signals are available): an endless loop is a failed exercise


@dataclass
class Row:
    """One tensor of one case: worst relative error against finite differences and against the reference."""
    tensor: str
    fd: float | None = None
    ref: float | None = None
    note: str = ""       # what the reference comparison saw (a factor, a sign, a shape)

    @property
    def failed(self) -> bool:
        return (self.fd is not None and not self.fd <= RTOL_FD) or (self.ref is not None and not self.ref <= RTOL_REF)

    @property
    def badness(self) -> float:
        """How far past its tolerance this tensor is (nan/inf count as infinitely far)."""
        scores = [v / tol if np.isfinite(v) else np.inf for v, tol in ((self.fd, RTOL_FD), (self.ref, RTOL_REF))
                  if v is not None]
        return max(scores, default=0.0)


@dataclass
class Result:
    """The grade of one exercise (``to_dict`` for the JSON report)."""
    name: str
    passed: bool
    fd_error: float | None
    ref_error: float | None
    wrong: list
    hint: str
    where: str
    seconds: float
    rows: list = field(default_factory=list)
    error: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


class Flag(Exception):
    """Raised inside an exercise to fail it with a precise message (e.g. a wrong shape), with no traceback."""

    def __init__(self, message: str, tensor: str = ""):
        super().__init__(message)
        self.tensor = tensor


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the absolute difference when b is all zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = float(np.abs(b).max(initial=0.0))
    diff = float(np.abs(a - b).max(initial=0.0)) if np.all(np.isfinite(a)) else np.inf
    return diff / scale if scale > 0 else diff


def close(a, b, tol: float = 1e-8) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and rel_err(a, b) <= tol


def read_mismatch(name: str, a, b, factors: dict) -> str:
    """A sentence on how ``a`` (the student's) differs from ``b`` (the reference): NaN, zeros, a factor, a sign."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return f"{name} has NaN or inf entries (an overflow or a division by zero?)"
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb > 0:
        return f"{name} is all zeros, but the right gradient is not"
    if nb == 0:
        return f"{name} should be all zeros (max |{name}| = {np.abs(a).max():.3g})"
    cos, ratio = float(np.vdot(a, b)) / (na * nb), na / nb
    if cos < -1 + 1e-6 and abs(ratio - 1) < 1e-6:
        return f"{name} has the wrong sign (it is -1 times the right value)"
    if abs(cos) > 1 - 1e-6:
        factor = ratio if cos > 0 else -ratio
        for label, value in factors.items():
            for k in (value, 1 / value):
                if value not in (0, 1) and abs(factor / k - 1) < 1e-6:
                    what = "too large" if abs(factor) > 1 else "too small"
                    return f"{name} is {factor:.6g} times the right value: {what} by a factor of {label} ({value:g})"
        return f"{name} is {factor:.6g} times the right value (right direction, wrong scale)"
    return f"{name} differs from the right value (cosine similarity {cos:.3f}, norm ratio {ratio:.3f})"


class Grader:
    """What an exercise function works with: the workspace, a seeded Generator, and the recording helpers."""

    def __init__(self, workspace, exercise, seed: int = 20240607):
        self.ws, self.exercise = workspace, exercise
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, Row] = {}
        self.suggestions: list[str] = []
        self.flags: list[str] = []
        self.flagged: list[str] = []      # tensors a flag names (dout, weight.grad)
        self.running = ""                 # "out" during the student's forward, "dx" during its backward
        self.factors: dict = {}

    def module(self, stem: str):
        return self.ws.module(stem)

    @property
    def ok(self) -> bool:
        return not self.flags and not any(r.failed for r in self.rows.values())

    def row(self, tensor: str) -> Row:
        return self.rows.setdefault(tensor, Row(tensor))

    def suggest(self, hint: str) -> None:
        """A precise hint from a probe (the first one wins over the generic reading)."""
        self.suggestions.append(hint)

    def flag(self, message: str, tensor: str) -> None:
        """Fail the exercise for a reason no tolerance measures (``dout`` modified, ``.grad`` overwritten)."""
        if message not in self.flags:
            self.flags.append(message)
        if tensor not in self.flagged:
            self.flagged.append(tensor)

    def compare(self, tensor: str, student, reference, factors: dict | None = None) -> float:
        """Record the student's ``tensor`` against the reference value; a wrong shape fails at once."""
        student = np.asarray(student)
        reference = np.asarray(reference)
        if student.shape != reference.shape:
            raise Flag(f"{tensor} has shape {student.shape}, expected {reference.shape}", tensor)
        row = self.row(tensor)
        err = rel_err(student, reference)
        row.ref = err if row.ref is None else max(row.ref, err)
        if not err <= RTOL_REF and not row.note:
            row.note = read_mismatch(tensor, student, reference, {**self.factors, **(factors or {})})
        return err

    def fd(self, tensor: str, err: float) -> None:
        row = self.row(tensor)
        row.fd = err if row.fd is None else max(row.fd, err)

    def fd_function(self, tensor: str, f, *arrays, **kwargs) -> None:
        """Central differences of a function ``f(*arrays) -> (out, vjp)`` (``check_function``), one row."""
        result = check_function(f, *arrays, rtol=RTOL_FD, rng=self.rng, raise_on_fail=False, **kwargs)
        self.fd(tensor, result.worst)

    def layer_case(self, label: str, student, reference, inputs, *, dx_name: str = "dx", wrt_inputs=None,
                   dout=None, fd: bool = True, fd_kwargs: dict | None = None) -> dict:
        """One forward + backward of the student's module and of the reference (given the student's state and
        mode), the same upstream gradient; then the student's module against central differences.

        Records ``out``, ``dx`` and every ``<param>.grad``, each suffixed `` (label)``. Before backward every
        ``.grad`` is pre-filled with random values, which the backward must *add* to; ``dout`` must come back
        unchanged. Returns the arrays (``dout``, ``student``/``reference`` dicts) for the exercise's probes."""
        suffix = f" ({label})" if label else ""
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        state = {k: v.copy() for k, v in student.state_dict().items()}
        if state:
            reference.load_state_dict(state)
        reference.train(student.training)
        self.running = f"out{suffix}"
        out_s = student(*inputs)
        dout = self.rng.standard_normal(np.shape(out_s)) if dout is None else dout
        params = list(student.named_parameters())
        prefill = {name: self.rng.standard_normal(p.data.shape) for name, p in params}
        for name, p in params:
            p.grad = prefill[name].copy()
        dout_before = np.array(dout, copy=True)
        self.running = f"{dx_name}{suffix}"
        dx_s = student.backward(dout)
        self.running = ""
        if not np.array_equal(np.asarray(dout), dout_before):
            self.flag(f"backward modified dout in place{suffix}: the upstream gradient belongs to the caller (other "
                      f"layers may read it); compute a new array (or work on dout.copy()) instead of writing into "
                      f"dout", f"dout{suffix}")
        grads_s = {name: np.asarray(p.grad) - prefill[name] for name, p in params}
        reference.zero_grad()
        out_r = reference(*inputs)
        dx_r = reference.backward(dout)
        grads_r = {name: np.asarray(p.grad).copy() for name, p in reference.named_parameters()}
        self.compare(f"out{suffix}", out_s, out_r)
        self.compare(f"{dx_name}{suffix}", dx_s, dx_r)
        for name, p in params:
            err = self.compare(f"{name}.grad{suffix}", grads_s[name], grads_r[name])
            if err > RTOL_REF and close(p.grad, grads_r[name]):
                self.flag(f"{name}.grad was overwritten, not accumulated{suffix}: backward must ADD its gradient "
                          f"(param.grad += ...), as gradients from several uses of a layer add up until zero_grad()",
                          f"{name}.grad{suffix}")
        if fd:
            student.load_state_dict(state)      # forward updated the running statistics: start again from state
            result = check_module(student, inputs, rtol=RTOL_FD, rng=self.rng, raise_on_fail=False,
                                  wrt_inputs=wrt_inputs, **(fd_kwargs or {}))
            for r in result.rows:
                name = dx_name if r.name.startswith("input") else f"{r.name}.grad"
                self.fd(f"{name}{suffix}", r.max_rel_err)
        return {"dout": dout, "student": {"out": out_s, dx_name: dx_s, **grads_s},
                "reference": {"out": out_r, dx_name: dx_r, **grads_r}}

    @contextlib.contextmanager
    def patched(self, module, **names):
        """Give the student's ``module`` the solution's helpers (e.g. ``col2im``) while grading another part of
        it, so each exercise grades its own regions only."""
        saved = {name: getattr(module, name) for name in names if hasattr(module, name)}
        try:
            for name, value in names.items():
                setattr(module, name, value)
            yield module
        finally:
            for name in names:
                if name in saved:
                    setattr(module, name, saved[name])
                elif hasattr(module, name):
                    delattr(module, name)


@contextlib.contextmanager
def _time_limit(seconds: float):
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds:g} s (an endless loop?)")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _worst(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values, key=lambda e: e if np.isfinite(e) else np.inf) if values else None


def grade(workspace, exercise, timeout: float = TIMEOUT_S) -> Result:
    """Run one exercise on a loaded workspace; never raises (an error is a failed exercise)."""
    g = Grader(workspace, exercise)
    where = exercise.location(workspace)
    start = time.perf_counter()
    error, hint = "", ""
    try:
        banned = forbidden_imports(workspace.package_dir / exercise.file)
        if banned:
            line, what = banned[0]
            raise Flag(f"{workspace.shown(exercise.stem)}:{line} imports {what}: write the exercise with NumPy; a "
                       f"workspace file may import only its own files, numpy, get_array_module and the Module "
                       f"classes (the textbook's rule), not the package's layers or the installed solution")
        with _time_limit(timeout), warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            exercise.grade(g)
    except Flag as e:
        error = str(e)
        hint = f"{e}. Hint: {exercise.hint}"
        g.flag(str(e), e.tensor or "(see the message)")
    except NotImplementedError as e:
        at = workspace_location(e, workspace.root, workspace.shown_root)
        error = describe(e, workspace.root, workspace.shown_root)
        hint = f"not done yet: write the region in {at or where}. Hint: {exercise.hint_at(workspace, at)}"
    except ImportError as e:
        error = hint = str(e)
    except (Exception, SystemExit) as e:    # SystemExit: a sys.exit() in the student's code; TimeoutError is one
        error = describe(e, workspace.root, workspace.shown_root)
        where_ = f"in the {'forward' if g.running.startswith('out') else 'backward'} pass: " if g.running else ""
        hint = f"{where_}{error}. Hint: {exercise.hint}"
    seconds = time.perf_counter() - start
    rows = list(g.rows.values())
    fd_error, ref_error = _worst(r.fd for r in rows), _worst(r.ref for r in rows)
    # the input gradient and the output first (what the exercise is about), then the parameters; worst first
    wrong = [r.tensor for r in sorted((r for r in rows if r.failed),
                                      key=lambda r: (not r.tensor.startswith(INPUTS), -r.badness))]
    wrong += [t for t in g.flagged if t not in wrong]
    if error and g.running and g.running not in wrong:      # an exception inside the student's forward/backward
        wrong.append(g.running)
    passed = not error and g.ok
    if not passed and not hint:
        worst = max((r for r in rows if r.failed), key=lambda r: r.badness, default=None)
        if g.suggestions:
            hint = g.suggestions[0]
        elif g.flags:
            hint = g.flags[0]
        elif worst is not None and worst.note:
            hint = f"{worst.note}. Hint: {exercise.hint}"
        elif worst is not None:
            hint = f"{worst.tensor} disagrees with central differences. Hint: {exercise.hint}"
        else:
            hint = exercise.hint
    if g.flags and error == "":
        error = "; ".join(g.flags)
    return Result(exercise.name, passed, fd_error, ref_error, wrong, "" if passed else hint, str(where), seconds,
                  rows, error)
