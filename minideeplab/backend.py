"""Array backend: NumPy on the CPU, CuPy on the GPU.

This is the only module that imports CuPy. Everything else asks the arrays which library they belong to
(``get_array_module``), so there is no global switch: a module whose parameters live on the GPU computes
on the GPU.
"""
from __future__ import annotations

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
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


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


def synchronize(x=None) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if _cupy is not None and (x is None or is_cuda_array(x)):
        try:
            _cupy.cuda.get_current_stream().synchronize()
        except Exception:
            pass
