"""Where a training step spends its time: exclusive time per layer type, and conv GEMM efficiency.

Used by ``minideeplab bench`` (benchmark code, never on a library hot path). ``TypeProfiler(model)`` wraps the
``forward``/``backward`` of every *leaf* module instance and the ``im2col``/``col2im`` functions the conv layer
calls, and charges each call's *exclusive* time (its time minus that of timed calls nested inside it) to a
category such as "conv forward" or "batch norm". Time not spent in any timed call (containers, the dense
blocks' buffer copies, Python glue) is what ``report(total)`` calls "other". Wrapping costs a few
microseconds per call, so the profiled step is slightly slower than an unprofiled one.

``gemm_reference(convs)`` times ``xp.matmul`` on the three GEMMs an im2col convolution of the same shape has to
do (forward ``W @ cols``, weight gradient ``dout @ cols^T``, input gradient ``W^T @ dout``), without any
im2col/col2im copies: the BLAS speed ceiling for those shapes. GEMM efficiency = that time / our conv time.

``CountingArray`` counts array operations instead of time (each one a kernel launch on a GPU, where a step of
small layers is bound by launches): ``TypeProfiler(model, clock=operations_counted)`` gives them by layer type.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from functools import partial

import numpy as np

from .backend import get_array_module, synchronize
from .bench import sample_times
from .nn import conv as conv_module
from .nn.fused import BNReLUConv1x1

CATEGORIES = {"Conv2d": "conv", "BatchNorm2d": "batch norm", "ReLU": "relu", "MaxPool2d": "pooling",
              "AvgPool2d": "pooling", "AdaptiveAvgPool2d": "pooling", "Upsample": "resize", "Concat": "concat",
              "Dropout": "dropout", "Identity": "identity", "Sigmoid": "sigmoid"}
FUSED = "BN + ReLU + 1x1 conv (fused)"


class TypeProfiler:
    """Exclusive wall time per layer type over the calls made while attached (see the module docstring).

    Args:
        model: the module tree to instrument (only leaf modules are wrapped).
        sync: call ``backend.synchronize()`` around each timed call (needed for honest GPU timings).
        clock: seconds counter; ``time.thread_time`` with a 1-thread BLAS gives CPU time, robust to a loaded machine.
    """

    def __init__(self, model, sync: bool = False, clock=time.perf_counter):
        self.model, self.sync, self.clock = model, sync, clock
        self.totals: dict[str, float] = {}
        self.per_conv: dict[int, list] = {}   # id(conv) -> [conv, forward seconds, backward seconds]
        self._stack: list[float] = []       # time of nested timed calls, one entry per open call
        self._undo: list = []

    @contextmanager
    def region(self, category: str, conv=None, slot: int = 0):
        """Time the enclosed code and charge its exclusive time to ``category``."""
        if self.sync:
            synchronize()
        self._stack.append(0.0)
        start = self.clock()
        try:
            yield
        finally:
            if self.sync:
                synchronize()
            elapsed = self.clock() - start
            nested = self._stack.pop()
            self.totals[category] = self.totals.get(category, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1] += elapsed
            if conv is not None:
                self.per_conv.setdefault(id(conv), [conv, 0.0, 0.0])[slot] += elapsed   # inclusive

    def _wrap(self, owner, name, category, conv=None, slot=0):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.region(category, conv, slot):
                return original(*args, **kwargs)
        # what the instance had of its own (a hooked method, nn/hooks.py) comes back on detach; else the class's
        own = owner.__dict__.get(name) if not isinstance(owner, type(conv_module)) else original
        object.__setattr__(owner, name, timed)
        self._undo.append((owner, name, own))

    def attach(self) -> TypeProfiler:
        for _, m in self.model.named_modules():
            if any(True for _ in m.children()):
                continue
            kind = type(m).__name__
            cat = CATEGORIES.get(kind, kind.lower())
            is_conv = kind == "Conv2d"
            self._wrap(m, "forward", cat + " forward" if is_conv else cat, m if is_conv else None, 1)
            self._wrap(m, "backward", cat + " backward" if is_conv else cat, m if is_conv else None, 2)
            if kind == "BatchNorm2d":       # a dense block calls it instead of backward (shared statistics)
                self._wrap(m, "backward_terms", cat)
        for _, m in self.model.named_modules():     # DenseNet's fused BN → ReLU → 1×1 conv heads
            head = getattr(m, "fused_head", None)
            if isinstance(head, BNReLUConv1x1):
                self._wrap(head, "forward", FUSED)
                self._wrap(head, "grad_at_norm_output", FUSED)   # its backward, up to the batch norm's
                self._wrap(head, "norm_sums", FUSED)             # and the batch norm's sums, from its GEMM
        self._wrap(conv_module, "im2col", "im2col")
        self._wrap(conv_module, "col2im", "col2im")
        return self

    def detach(self) -> None:
        for owner, name, original in reversed(self._undo):
            if isinstance(owner, type(conv_module)):
                setattr(owner, name, original)
            elif original is not None:
                owner.__dict__[name] = original
            else:
                owner.__dict__.pop(name, None)
        self._undo.clear()

    def reset(self) -> None:
        self.totals.clear()
        self.per_conv.clear()

    def report(self, total: float) -> list[dict]:
        """Rows ``{category, seconds, share}`` sorted by time, with "other" = total - timed, shares of total."""
        rows = [{"category": c, "seconds": t} for c, t in self.totals.items()]
        rows.append({"category": "other (containers, block buffers, glue)",
                     "seconds": max(total - sum(self.totals.values()), 0.0)})
        for r in rows:
            r["share"] = r["seconds"] / total if total > 0 else 0.0
        return sorted(rows, key=lambda r: -r["seconds"])


class CountingArray(np.ndarray):
    """A NumPy array that counts the operations made on it, in ``CountingArray.counts`` (name -> calls).

    Counted: ufunc calls (arithmetic, comparisons, ``matmul``, and reductions such as ``sum``), array functions
    (``einsum``, ``where``, ...), ``a[...] = b``, gathers ``a[index_array]``, ``copy``/``astype``, and a call of a
    ``backend.fuse`` function as one: what a GPU runs as a kernel each. Not counted: creation (``empty``,
    ``zeros``), views, reshapes, what an array function does inside it, and the assignment of a view to itself that
    ``a[k] += b`` ends with (CuPy and NumPy skip it). Host reads of a value (``bool(a)``, ``float(a)``,
    ``a.item()``), each a synchronisation on a GPU, go to ``CountingArray.syncs``. Results of counted operations are
    ``CountingArray`` again, so a model whose parameters, buffers and input are one counts its whole step;
    ``benchmarks/count_ops.py`` does that to estimate a training step's kernel launches on the CPU. With
    ``CountingArray.capturing = True`` code takes the path of a step captured as a CUDA graph (``backend.can_read``).
    """

    counts: Counter = Counter()
    syncs: Counter = Counter()   # reads of a value on the host (bool, float, int, item): a GPU waits for its queue
    capturing = False            # True: backend.can_read says no, code takes a CUDA graph capture's path
    inside = 0                   # > 0 while an array function runs: the operations it makes are not counted again
    launch_bound = True          # backend.launch_bound: code takes a GPU's paths (gather convs, whole-buffer steps)

    def __bool__(self):
        CountingArray.syncs["bool"] += 1
        return super().__bool__()

    def __float__(self):
        CountingArray.syncs["float"] += 1
        return super().__float__()

    def __int__(self):
        CountingArray.syncs["int"] += 1
        return super().__int__()

    def item(self, *args):
        CountingArray.syncs["item"] += 1
        return super().item(*args)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _count(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
        inputs = tuple(_plain(a) for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(a) for a in kwargs["out"])
        return _counting_all(getattr(ufunc, method)(*inputs, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in _NO_KERNEL:
            _count(func.__name__)
        CountingArray.inside += 1                   # what it does inside (np.clip calls a ufunc) is this one operation
        try:
            result = super().__array_function__(func, types, args, kwargs)
        finally:
            CountingArray.inside -= 1
        return _counting_all(result)

    def __getitem__(self, key):
        if _advanced(key):                           # a gather (fancy indexing) copies: a kernel; a slice is a view
            _count("take")
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        if not _same_view(self, key, value):        # a[k] += b assigns a[k] to itself: CuPy (and NumPy) skip that
            _count("setitem")
        super().__setitem__(key, value)

    def mean(self, *args, out=None, **kwargs):
        _count("mean")                              # one reduction kernel on a GPU (CuPy divides as it sums)
        result = np.ndarray.mean(self.view(np.ndarray), *args, out=_plain(out), **kwargs)
        return out if out is not None else _counting(result)

    @staticmethod
    def fused_call(fn, args):
        """A ``backend.fuse`` function called with counting arrays: one operation (one fused kernel on a GPU), its
        parts uncounted; the arrays it returns count again."""
        _count("fused")
        return _counting_all(fn(*(_plain(a) for a in args)))

    def copy(self, *args, **kwargs):
        _count("copy")
        return super().copy(*args, **kwargs)

    def astype(self, *args, **kwargs):
        _count("astype")
        return super().astype(*args, **kwargs)


# array functions that make views or allocate only: no kernel
_NO_KERNEL = frozenset({"empty_like", "broadcast_to", "split", "array_split", "swapaxes", "transpose", "squeeze",
                        "expand_dims", "moveaxis"})


def _count(name: str) -> None:
    if not CountingArray.inside:
        CountingArray.counts[name] += 1


def _advanced(key) -> bool:
    """Whether indexing with ``key`` gathers (an integer or boolean array or list in it) rather than views."""
    return any(isinstance(k, (list, np.ndarray)) for k in (key if isinstance(key, tuple) else (key,)))


def _same_view(a, key, value) -> bool:
    """Whether ``value`` is the very view ``a[key]`` (same memory, shape and strides): what Python's ``a[key] += b``
    assigns back after adding in place, and what CuPy's and NumPy's assignment skip without a kernel or a copy."""
    if not isinstance(value, np.ndarray) or _advanced(key):
        return False
    target = np.ndarray.__getitem__(a, key)
    return (isinstance(target, np.ndarray) and target.shape == value.shape and target.strides == value.strides
            and target.__array_interface__["data"][0] == value.__array_interface__["data"][0])


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, CountingArray) else a


def _counting_all(result):
    """``_counting`` of a result, or of each array of a tuple of results."""
    return tuple(_counting(r) for r in result) if isinstance(result, tuple) else _counting(result)


def _counting(a):
    """A counting view of an ndarray result; a NumPy scalar becomes a 0-d one (CuPy returns 0-d arrays too)."""
    if isinstance(a, np.generic):
        return np.asarray(a).view(CountingArray)
    return a.view(CountingArray) if type(a) is np.ndarray else a


@contextmanager
def counting_creation():
    """Within: NumPy's ``empty``, ``zeros``, ``ones``, ``full`` and ``ascontiguousarray`` return ``CountingArray``
    (these take no array to dispatch on), so the operations on arrays a step allocates count too; ``zeros``,
    ``ones``, ``full`` and a copying ``ascontiguousarray`` count as one operation each (a fill or copy kernel)."""
    saved = {name: getattr(np, name) for name in ("empty", "zeros", "ones", "full", "ascontiguousarray")}

    def creator(name, make):
        def created(*args, **kwargs):
            out = make(*args, **kwargs)
            source = args[0] if args else kwargs.get("a")
            copied = name == "ascontiguousarray" and not np.may_share_memory(out, np.asarray(source))
            if name in ("zeros", "ones", "full") or copied:
                _count(name)
            return _counting(out)
        return created
    for name, make in saved.items():
        setattr(np, name, creator(name, make))
    try:
        yield
    finally:
        for name, make in saved.items():
            setattr(np, name, make)


def operations_counted() -> int:
    """All operations counted so far by ``CountingArray`` (a clock for ``TypeProfiler``: operations by layer type)."""
    return sum(CountingArray.counts.values())


def conv_gemm_shapes(conv):
    """(N, F, K, P) of the im2col GEMMs of ``conv``'s last forward: W (F, K) @ cols (N, K, P)."""
    N, C = conv.x_shape[:2]
    _, F, Ho, Wo = conv.output_shape(conv.x_shape)
    return N, F, C * conv.kernel_size[0] * conv.kernel_size[1], Ho * Wo


def _im2col_gemms(xp, w, cols, d) -> None:
    """Forward ``W @ cols``, weight gradient ``dout @ cols^T`` (summed over N), input gradient ``W^T @ dout``."""
    w @ cols
    xp.matmul(d, cols.transpose(0, 2, 1)).sum(axis=0)
    w.T @ d


def gemm_reference(convs, xp=None, dtype="float32", repeats: int = 3, sync: bool = False) -> dict:
    """Best-of-``repeats`` time of the three im2col GEMMs of each distinct conv shape: {(N, F, K, P): seconds}."""
    out = {}
    for conv in convs:
        key = conv_gemm_shapes(conv)
        if key in out:
            continue
        xp = xp or get_array_module(conv.weight.data)
        N, F, K, P = key
        w, cols, d = xp.ones((F, K), dtype), xp.ones((N, K, P), dtype), xp.ones((N, F, P), dtype)
        gemms = partial(_im2col_gemms, xp, w, cols, d)
        out[key] = min(sample_times(gemms, repeats, warmup=1, sync=synchronize if sync else None))
    return out
