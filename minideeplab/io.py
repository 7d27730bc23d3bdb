"""Weights in and out: ``.npz`` files with a JSON meta record, written atomically.

A checkpoint is a plain NumPy ``.npz`` archive (``allow_pickle=False`` on both sides): one array per state-dict
key plus a reserved entry ``__minideeplab_meta__`` holding a JSON string (format version, model config, and
whatever the caller adds, e.g. the epoch). Files are written to a temporary file in the same folder and moved
into place with ``os.replace``, so a crash mid-write never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

from .backend import to_numpy

META_KEY = "__minideeplab_meta__"
FORMAT_VERSION = 1


def write_npz(path, arrays: dict, meta: dict | None = None) -> None:
    """Write ``arrays`` (name -> NumPy or CuPy array) and ``meta`` (JSON-able dict) to ``path`` atomically.

    Args:
        path: destination file (conventionally ``*.npz``; no suffix is added).
        arrays: the arrays to store; CuPy arrays are copied to the host.
        meta: JSON-serialisable metadata (config, epoch, ...); stored as a JSON string.
    """
    path = os.fspath(path)
    if META_KEY in arrays:
        raise ValueError(f"write_npz: the array name {META_KEY!r} is reserved for the meta record")
    meta = dict(meta or {})
    meta.setdefault("format_version", FORMAT_VERSION)
    try:
        meta_json = json.dumps(meta)
    except TypeError as e:
        raise TypeError(f"write_npz: meta for {path!r} is not JSON-serialisable: {e}") from None
    host = {str(k): to_numpy(v) for k, v in arrays.items()}
    for k, v in host.items():
        if v.dtype == object:
            raise TypeError(f"write_npz: array {k!r} has dtype object; only numeric arrays can be stored")
    host[META_KEY] = np.array(meta_json)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **host)   # a file object: NumPy does not append ".npz" to the temporary name
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)      # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_npz(path) -> tuple[dict, dict]:
    """Read a file written by ``write_npz``.

    Returns:
        ``(arrays, meta)``: a dict of NumPy arrays (in file order) and the meta dict.

    Raises:
        ValueError naming the file when it is missing, not a valid ``.npz``, or has no minideeplab meta record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_npz: no such checkpoint file: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise ValueError(f"read_npz: {path!r} is not a readable .npz archive ({type(e).__name__}: {e})") from None
    if META_KEY not in arrays:
        raise ValueError(f"read_npz: {path!r} is a .npz archive but not a minideeplab checkpoint "
                         f"(no {META_KEY!r} record)")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except json.JSONDecodeError as e:
        raise ValueError(f"read_npz: the meta record of {path!r} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"read_npz: the meta record of {path!r} is not a JSON object")  # noqa: TRY004 (bad file)
    return arrays, meta
