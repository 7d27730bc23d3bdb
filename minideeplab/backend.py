"""Array backend: NumPy on the CPU, CuPy on the GPU.

This is the only module that imports CuPy. Everything else asks the arrays which library they belong to
(``get_array_module``), so there is no global switch: a module whose parameters live on the GPU computes
on the GPU.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

try:  # CuPy is an optional extra; any build (cupy-cuda12x, cupy-cuda13x, ...) works.
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None

DEVICES = ("cpu", "cuda")


def cuda_available() -> bool:
    """True when CuPy imports and at least one GPU is visible."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array (or stands for one while ``cupy.fuse`` traces a function,
    see ``fuse``), else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
        return _cupy.get_array_module(*arrays)      # knows the stand-ins of cupy.fuse's tracing too
    return np


def scatter_add(target, index, values) -> None:
    """``target[index] += values`` in place, where an index that repeats adds each of its values (``np.add.at``).

    CuPy has ``cupy.add.at`` from version 12; an older build (``cupy-cuda11x``) has ``cupyx.scatter_add``, which
    does the same."""
    at = getattr(get_array_module(target).add, "at", None)
    if at is None:
        import cupyx
        at = cupyx.scatter_add
    at(target, index, values)


def is_cuda_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cuda" if is_cuda_array(x) else "cpu"


def to_numpy(x):
    """Copy a CuPy array to the host; NumPy arrays and scalars pass through as NumPy."""
    if is_cuda_array(x):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not cuda_available():
        raise ValueError("device 'cuda' requested but CuPy is not installed or no GPU is visible "
                         "(install the 'gpu' extra, e.g. pip install cupy-cuda12x)")
    return device


def to_device(x, device: str):
    """Return ``x`` as an array on ``device`` ('cpu' or 'cuda'); no copy when it is already there."""
    check_device(device)
    if device == "cpu":
        return to_numpy(x)
    return _cupy.asarray(x)


def launch_bound(x) -> bool:
    """Whether every array operation on ``x`` is a kernel launch that costs more than small work itself: a CuPy
    array (~10 µs of Python and driver time per launch), or an array that stands for one on the CPU
    (``profiler.CountingArray``, ``launch_bound = True``). Code then prefers fewer, larger operations: the "gather"
    convolution path, optimizer updates over whole flat buffers."""
    return is_cuda_array(x) or bool(getattr(x, "launch_bound", False))


def _capturing() -> bool:
    """Whether CuPy work now goes into a CUDA graph being captured, or takes that path (``as_captured``)."""
    if _as_captured_depth:
        return True
    if getattr(_cupy.cuda.runtime, "is_hip", False):
        return False                                 # no graph capture on HIP
    try:
        return _cupy.cuda.get_current_stream().is_capturing()
    except Exception:                                # a query the driver refuses: play safe
        return True


def matmul(a, b, out=None):
    """``a @ b`` (NumPy's matmul: matrices, stacks of them that broadcast, 1-D operands), into ``out`` if given.

    ``xp.matmul`` everywhere but on CuPy while a step is captured as a CUDA graph (``cuda_graph``, and its warm-up
    steps): CuPy refuses to call cuBLAS then, so the product goes to cuBLAS directly (``_cublas``)."""
    if is_cuda_array(a) and _capturing():
        from . import _cublas
        return _cublas.matmul(_cupy, a, b, out)
    return get_array_module(a, b).matmul(a, b, out=out)


def can_read(x) -> bool:
    """Whether code may read a value of ``x`` on the host: to take a faster path for some values, or to check input.

    NumPy: always (free). CuPy: unless the current stream is being captured as a CUDA graph (``cuda_graph``), which
    cannot contain a read; outside a capture a read waits for the queued kernels, which costs less than the dozen
    extra small kernels of a general path when a step is bound by launches. Arrays that stand for device arrays on
    the CPU (``profiler.CountingArray``) answer ``not x.capturing``, so that both paths can be counted and tested.
    Within ``as_captured()`` CuPy arrays answer False too (``cuda_graph``'s warm-up steps).
    """
    if is_cuda_array(x):
        return not _capturing()
    return not getattr(x, "capturing", False)


class fuse:
    """Decorator: ``fn``'s elementwise work as ONE GPU kernel on CuPy arrays (``cupy.fuse``); on NumPy arrays ``fn``
    itself runs, the very same code.

    For the small per-channel chains of a batch norm (``1 / sqrt(var + eps)``, running averages, the terms of its
    backward) and elementwise chains over a whole tensor: on a GPU each operation of the chain is a kernel launch
    that costs more than its arithmetic (and a trip to memory), fused they are one. ``fn`` takes arrays that
    broadcast together and Python numbers (no arithmetic between two numbers inside: CuPy does it in the smallest
    dtype that holds them, float16 for ``1 - 0.1``; pass the result in), uses arithmetic, comparisons and the ufuncs
    of ``get_array_module(array argument)`` (``where``, ``sqrt``, ``isfinite``, ...), may update an argument in
    place (``a += b``, ``a[...] = b``) and returns an array, a tuple of them, or None; no reductions, no host reads,
    no creation routines. Where CuPy cannot fuse it (``fuse.failures`` records why), it runs operation by operation
    with a warning. An array type that stands for device arrays on the CPU may take the call (``fused_call``:
    ``profiler.CountingArray`` counts it as one operation).
    """

    functions: dict = {}     # "module.name" -> every function fused so far (the tests check each on a GPU)
    failures: dict = {}      # "module.name" -> the error with which cupy.fuse refused it

    def __init__(self, fn):
        self.fn, self.__name__, self.__doc__ = fn, fn.__name__, fn.__doc__
        self.name = f"{fn.__module__}.{fn.__name__}"
        self.kernel = _cupy.fuse(fn) if _cupy is not None else None   # compiled at its first call per dtypes
        fuse.functions[self.name] = self

    def __call__(self, *args):
        for a in args:                            # (CuPy arrays and stand-ins for them are never mixed)
            if is_cuda_array(a):
                return self._on_gpu(args)
            hook = getattr(type(a), "fused_call", None)
            if hook is not None:
                return hook(self.fn, args)
        return self.fn(*args)

    def _on_gpu(self, args):
        if self.kernel is not None:
            try:
                return self.kernel(*args)
            except Exception as error:            # raised while tracing or compiling: nothing has run yet
                self.kernel, fuse.failures[self.name] = None, error
                warnings.warn(f"{self.name}: cupy.fuse could not fuse it ({type(error).__name__}: {error}); "
                              f"it runs operation by operation", RuntimeWarning, stacklevel=3)
        return self.fn(*args)


_as_captured_depth = 0


@contextmanager
def as_captured():
    """Within: code takes the path it takes while a CUDA graph is captured (``can_read`` is False for CuPy arrays),
    without capturing. ``cuda_graph`` warms up this way, so that the kernels of that path (the fused heads' general
    bounds, ...) are compiled and loaded before the capture, which must not wait for them."""
    global _as_captured_depth
    _as_captured_depth += 1
    try:
        yield
    finally:
        _as_captured_depth -= 1


def capturing() -> bool:
    """Whether a CUDA graph is being captured now, or code takes the captured path (``as_captured``): Python run
    now will not run again at a replay (``nn.hooks`` refuses to run hooks then). False without CuPy."""
    return bool(_as_captured_depth) or (_cupy is not None and _capturing())


def synchronize(x=None) -> None:
    """Wait for queued GPU work on every stream (for honest timings); a no-op on the CPU."""
    if _cupy is not None and (x is None or is_cuda_array(x)):
        try:
            _cupy.cuda.Device().synchronize()
        except Exception:
            pass


def cuda_graph(step, prepare=None, warmup: int = 2):
    """Capture the GPU work of ``step()`` as a CUDA graph; returns ``replay()``, which runs that work again in one launch.

    A training step of DenseNet's many small layers issues ~10^4 kernels, and launching them one by one from Python
    costs more than running them (benchmarks/README.md); a graph launches them all at once. Captured is what the
    GPU did, not the Python code: a replay reads and writes the very arrays the captured step used, with every
    Python value (learning rate, shapes, branches taken) frozen as it was. So the step must keep its state in
    arrays it updates in place (parameters, gradients, optimizer and batch-norm state all are), read no array
    value on the host (code asks ``can_read``: the fused heads take their general path, the losses skip their
    0/1 check of the target, so check new targets before copying them in), copy nothing from the host (new data
    goes into the step's input arrays before a replay), and use the same shapes every time. ``prepare()`` runs
    before each of the ``warmup`` steps, the captured one and every replay, on the graph's stream: the place to
    copy in what must change between replays (``Dropout.draw_ahead``). The step's temporaries come from a memory
    pool of its own that nothing else uses, so the addresses baked into the graph stay the graph's. The warm-up
    steps take the captured path (``as_captured``), so that its kernels are compiled before the capture. Needs a
    GPU (CuPy); the step should have run once already (cached shapes).
    """
    if not cuda_available():
        raise ValueError("cuda_graph: needs CuPy and a visible GPU (CUDA graphs capture GPU work only)")
    prepare = prepare or (lambda: None)
    synchronize()                                   # what the default stream queued is done before the graph's stream
    stream, pool = _cupy.cuda.Stream(non_blocking=True), _cupy.cuda.MemoryPool()
    with stream, _cupy.cuda.using_allocator(pool.malloc):
        with as_captured():                         # the captured path: the pool grows to what a step needs, its
            for _ in range(warmup):                 # kernels are compiled and loaded
                prepare()
                step()
        prepare()
        stream.synchronize()
        stream.begin_capture()
        try:
            step()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:                       # the capture was invalidated: report the step's own error
                pass
            raise
        graph = stream.end_capture()

    def replay():
        caller = _cupy.cuda.get_current_stream()
        with stream:
            stream.wait_event(caller.record())     # after what the caller queued (new data copied into the inputs)
            prepare()
            graph.launch(stream)
        caller.wait_event(stream.record())         # and before what it queues next (reading the outputs)

    replay.graph, replay.stream, replay.pool = graph, stream, pool    # alive as long as replay is
    return replay


def copy_into(dst, src) -> None:
    """``dst[...] = src`` for an array that must stay where it is (a captured step's input): a host array into a
    CuPy one is one host-to-device copy on the current stream (``ndarray.set``)."""
    if is_cuda_array(dst) and not is_cuda_array(src):
        dst.set(np.ascontiguousarray(src, dtype=dst.dtype))
    else:
        dst[...] = src


class GraphStep:
    """``step()`` run on a stream and a memory pool of its own, as a CUDA graph needs, and run exactly once per call:
    the first ``warmup`` calls run it on the captured path (``as_captured``: its kernels compile and load, the pool
    grows to what a step needs), the next call captures it as a CUDA graph and launches that, every later call
    replays the graph (one launch).

    Unlike ``cuda_graph``, whose warm-up steps and capture are extra steps, every call here is one real step, so a
    training loop can run all its steps through it (``graph_step.CapturedTrainStep``). What changes between calls
    (the batch, dropout masks, the learning-rate counters) is written into the step's arrays before the call, on
    the current stream: the step runs after that, and what the caller queues afterwards (reading the step's
    outputs) runs after the step. The rules of ``cuda_graph`` hold (arrays updated in place, no host reads, no
    copies from the host inside the step, the same shapes every call). After the capture ``captured`` is True.
    """

    def __init__(self, step, warmup: int = 2):
        if not cuda_available():
            raise ValueError("GraphStep: needs CuPy and a visible GPU (CUDA graphs capture GPU work only)")
        self.step, self.warmup, self.runs, self.graph = step, int(warmup), 0, None
        self.stream, self.pool = _cupy.cuda.Stream(non_blocking=True), _cupy.cuda.MemoryPool()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        caller = _cupy.cuda.get_current_stream()
        with self.stream:
            self.stream.wait_event(caller.record())          # after what the caller queued (the new inputs)
            if self.graph is None:
                with _cupy.cuda.using_allocator(self.pool.malloc):
                    if self.runs < self.warmup:
                        with as_captured():
                            self.step()
                    else:
                        self._capture()
            if self.graph is not None:
                self.graph.launch(self.stream)
        caller.wait_event(self.stream.record())              # before what the caller queues next (the outputs)
        self.runs += 1

    def _capture(self) -> None:
        self.stream.synchronize()
        self.stream.begin_capture()
        try:
            self.step()
        except BaseException:
            try:
                self.stream.end_capture()
            except Exception:                                # the capture was invalidated: report the step's error
                pass
            raise
        self.graph = self.stream.end_capture()
