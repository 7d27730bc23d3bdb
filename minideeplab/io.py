"""Weights in and out: ``.npz`` files with a JSON meta record, written atomically.

A checkpoint is a plain NumPy ``.npz`` archive (``allow_pickle=False`` on both sides): one array per state-dict
key plus a reserved entry ``__minideeplab_meta__`` holding a JSON string (format version, model config, and
whatever the caller adds, e.g. the epoch). Files are written to a temporary file in the same folder and moved
into place with ``os.replace``, so a crash mid-write never leaves a half-written checkpoint under the real name.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from contextlib import contextmanager

import numpy as np

from .backend import to_numpy

META_KEY = "__minideeplab_meta__"
FORMAT_VERSION = 1


@contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """Open a temporary file beside ``path`` for writing; on success it is flushed, synced, given the mode a new file
    gets under the umask (``mkstemp`` makes it 0600) and moved onto ``path`` with ``os.replace`` (readers see the old
    file or the new one, never half of one); on any error, Ctrl-C included, it is removed. The folder is created if
    missing. An ``OSError`` (full disk, read-only folder) names ``path``, not the temporary file.

    Usage: ``with atomic_write("runs/x/history.csv", "w", newline="") as f: ...``
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)       # the rename itself survives a power cut (and so does the order of two renames)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and path not in str(e):
            raise OSError(e.errno, f"cannot write {path!r}: {e.strerror or e}") from e
        raise


def _umask() -> int:
    """The process's umask; read from /proc where it can be (setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:             # not possible everywhere (Windows); the rename is done either way
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def copy_file(src, dst) -> None:
    """Copy ``src`` to ``dst`` atomically (``atomic_write``)."""
    import shutil
    with open(src, "rb") as f_in, atomic_write(dst) as f_out:
        shutil.copyfileobj(f_in, f_out, 1 << 20)


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
    with atomic_write(path) as f:
        np.savez(f, **host)   # a file object: NumPy does not append ".npz" to the temporary name


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
    if not zipfile.is_zipfile(path):   # else np.load guesses .npy or pickle and its message misleads
        raise ValueError(f"read_npz: {path!r} is not a readable .npz archive (not a zip file; "
                         f"a checkpoint is RUN/best.npz or RUN/last.npz)")
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


def read_meta(path) -> dict:
    """The meta record of a file written by ``write_npz``, without reading its arrays.

    Raises:
        ValueError naming the file when it cannot be read or has no minideeplab meta record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_meta: no such checkpoint file: {path!r}")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a .npz archive")
        with np.load(path, allow_pickle=False) as data:
            if META_KEY not in data.files:
                raise ValueError("no minideeplab meta record")
            meta = json.loads(str(data[META_KEY]))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"read_meta: {path!r} is not a readable minideeplab checkpoint ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"read_meta: the meta record of {path!r} is not a JSON object")  # noqa: TRY004 (bad file)
    return meta


# -- models ----------------------------------------------------------------------------------------------------
def export_state_dict(model) -> dict:
    """Copies of every parameter and buffer as NumPy arrays, under the model's state-dict keys.

    The keys and shapes are those of ``minideeplab.torch_oracle.TorchDeepLabV3`` (and, under ``backbone.``, of
    torchvision's DenseNet ``features``), so ``torch_module.load_state_dict({k: torch.from_numpy(v) ...})``
    works: the way out for users who outgrow NumPy.
    """
    return {k: np.array(to_numpy(v)) for k, v in model.state_dict().items()}


def _short(items, limit=8) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _state_mismatches(own: dict, arrays: dict) -> list[str]:
    missing = [k for k in own if k not in arrays]
    unexpected = [k for k in arrays if k not in own]
    shapes = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(arrays[k].shape)}"
              for k in own if k in arrays and tuple(own[k].shape) != tuple(arrays[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing from the file ({_short(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the file ({_short(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_short(shapes)})")
    return problems


def _model_arrays_and_config(arrays: dict, meta: dict) -> tuple[dict, dict | None]:
    """The model's state-dict arrays and config dict, from a ``save`` file or a training checkpoint (which stores
    the weights under ``model.`` beside the optimizer's, and the config as ``model_config``)."""
    from .checkpoint import CHECKPOINT_KIND  # lazy: checkpoint.py imports this module

    if meta.get("kind") == CHECKPOINT_KIND:
        return {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}, meta.get("model_config")
    return arrays, meta.get("config")


def save(model, path, meta: dict | None = None) -> None:
    """Save ``model``'s parameters and buffers to ``path`` (.npz, atomic), with its config in the meta record.

    Args:
        model: a model built by ``build_deeplab`` (its ``config`` is stored so ``load_model`` can rebuild it).
        path: destination file.
        meta: extra JSON-able metadata (epoch, metrics, ...), stored alongside.
    """
    config = getattr(model, "config", None)
    arrays = export_state_dict(model)
    first = next(iter(arrays.values()))
    record = {"kind": type(model).__name__, "dtype": str(first.dtype),
              "config": config.to_dict() if hasattr(config, "to_dict") else None}
    record.update(meta or {})
    write_npz(path, arrays, record)


def load(model, path, check_config: bool = True) -> dict:
    """Load a file written by ``save``, or a training checkpoint, into ``model`` (in place, onto its device and dtype).

    Raises ``ValueError`` naming the file and the mismatching keys/shapes when the checkpoint comes from another
    architecture, and the differing config fields when it comes from another configuration (e.g. another output
    stride, whose parameters have the same shapes). Pass ``check_config=False`` to load such weights on purpose
    (e.g. train at output stride 16, evaluate at 8).

    Returns:
        the checkpoint's meta dict.
    """
    arrays, meta = read_npz(path)
    arrays, saved = _model_arrays_and_config(arrays, meta)
    problems = _state_mismatches(model.state_dict(), arrays)
    config = getattr(model, "config", None)
    if check_config and hasattr(config, "to_dict") and isinstance(saved, dict):
        ours = config.to_dict()
        diff = [f"{k}: model {ours.get(k)!r} vs file {saved.get(k)!r}" for k in sorted(set(ours) | set(saved))
                if ours.get(k) != saved.get(k)]
        if diff:
            problems.append(f"config differs ({'; '.join(diff)}); pass check_config=False to load anyway"
                            if not problems else f"config differs ({'; '.join(diff)})")
    if problems:
        raise ValueError(f"load: checkpoint {os.fspath(path)!r} does not match the model: " + "; ".join(problems))
    model.load_state_dict(arrays, strict=True)
    return meta


def load_model(path, dtype=None):
    """Rebuild the network described by a checkpoint's config and load its weights.

    Args:
        path: a file written by ``save``, or a training checkpoint (``minideeplab.checkpoint``), whose weights
            are stored under ``model.`` with the config as ``model_config``.
        dtype: parameter dtype (default: the dtype the checkpoint was saved in).
    """
    return load_model_and_meta(path, dtype)[0]


def load_model_and_meta(path, dtype=None):
    """``load_model`` that also returns the checkpoint's meta record: ``(model, meta)``."""
    from .models import DeepLabConfig, build_deeplab

    arrays, meta = read_npz(path)
    arrays, config_dict = _model_arrays_and_config(arrays, meta)
    if not config_dict:
        raise ValueError(f"load_model: checkpoint {os.fspath(path)!r} has no model config in its meta record "
                         "(build the model yourself and use load(model, path))")
    try:
        config = DeepLabConfig.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_model: checkpoint {os.fspath(path)!r} has an invalid model config ({e})") from None
    if dtype is None:   # the dtype the weights were saved in
        dtype = meta.get("dtype") or next((a.dtype for a in arrays.values() if a.dtype.kind == "f"), "float32")
    dtype = np.dtype(dtype)
    model = build_deeplab(config, rng=np.random.default_rng(0), dtype=dtype)
    problems = _state_mismatches(model.state_dict(), arrays)
    if problems:
        raise ValueError(f"load_model: checkpoint {os.fspath(path)!r} does not match its own config: "
                         + "; ".join(problems))
    model.load_state_dict(arrays, strict=True)
    return model, meta


# torchvision's old checkpoints name the dense-layer modules 'norm.1', 'relu.1', 'conv.1', 'norm.2', ... (dots
# are no longer allowed in module names); the ImageNet densenet121 .pth still has them.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def import_torchvision_densenet121(path_or_state_dict, model):
    """Load torchvision's DenseNet-121 weights (e.g. the ImageNet ``densenet121-a639ec97.pth``) into a backbone.

    Args:
        path_or_state_dict: a ``.pth`` path (read with ``torch.load(..., weights_only=True)``; needs torch) or a
            state dict of torch tensors / NumPy arrays. Legacy keys ``denselayerN.norm.1.weight`` are renamed to
            ``denselayerN.norm1.weight`` (same for relu/conv and ``.2``); ``classifier.*`` is ignored; a missing
            ``num_batches_tracked`` (old checkpoints) keeps the model's value.
        model: a ``DeepLabV3`` (its ``backbone`` is loaded) or a ``DenseNet``, built with the densenet121 shape.

    Returns:
        ``model`` (loaded in place; the head keeps its initialisation).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        try:
            import torch
        except ImportError:
            raise ImportError("import_torchvision_densenet121: reading a .pth file needs PyTorch "
                              "(pip install torch), or pass a state dict of NumPy arrays") from None
        state = torch.load(os.fspath(path_or_state_dict), map_location="cpu", weights_only=True)
    else:
        state = path_or_state_dict
    arrays = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        m = _LEGACY_KEY.match(key)
        key = m.group(1) + m.group(2) if m else key
        arrays[key] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    backbone = getattr(model, "backbone", model)
    own = backbone.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked") and k not in arrays}
    problems = _state_mismatches({k: v for k, v in own.items() if k not in optional}, arrays)
    if problems:
        raise ValueError("import_torchvision_densenet121: the state dict does not fit the DenseNet-121 backbone: "
                         + "; ".join(problems))
    backbone.load_state_dict(arrays, strict=False)
    return model
