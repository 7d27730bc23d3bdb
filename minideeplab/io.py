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
        ValueError naming the file when it is missing, a folder, unreadable (permission denied), not a valid
        ``.npz``, or has no minideeplab meta record.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"read_npz: {path!r} is a folder, not a checkpoint file (a checkpoint is RUN/best.npz or "
                         "RUN/last.npz)")
    if not os.path.isfile(path):
        raise ValueError(f"read_npz: no such checkpoint file: {path!r}")
    try:                               # is_zipfile would call an unreadable file "not a zip file"
        with open(path, "rb") as f:
            f.read(4)
    except PermissionError:
        raise ValueError(f"read_npz: checkpoint {path!r} is unreadable (permission denied)") from None
    except OSError as e:
        raise ValueError(f"read_npz: checkpoint {path!r} is unreadable ({e.strerror or e})") from None
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


def _state_mismatches(own: dict, arrays: dict, limit: int = 8) -> list[str]:
    missing = [k for k in own if k not in arrays]
    unexpected = [k for k in arrays if k not in own]
    shapes = [f"{k}: model {tuple(own[k].shape)} vs file {tuple(arrays[k].shape)}"
              for k in own if k in arrays and tuple(own[k].shape) != tuple(arrays[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing from the file ({_short(missing, limit)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys in the file ({_short(unexpected, limit)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_short(shapes, limit)})")
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


# -- torchvision's DenseNet-121 weights in ----------------------------------------------------------------------
# torchvision's old checkpoints name the dense-layer modules 'norm.1', 'relu.1', 'conv.1', 'norm.2', ... (dots
# are no longer allowed in module names); the ImageNet densenet121 .pth still has them.
_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
# where training scripts nest the weights: torch.save({"epoch": 5, "state_dict": ..., "optimizer": ...}, path)
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")
_TV_NAME = "import_torchvision_densenet121"
TORCHVISION_DENSENET121_URL = "https://download.pytorch.org/models/densenet121-a639ec97.pth"


def import_torchvision_densenet121(path_or_state_dict, model, allow_pickle: bool = False):
    """Load torchvision's DenseNet-121 weights (e.g. the ImageNet ``densenet121-a639ec97.pth``) into a backbone.

    Args:
        path_or_state_dict: a ``.pth`` path (read with ``torch.load(..., weights_only=True)``; needs torch) or a
            state dict of torch tensors / NumPy arrays. Accepted too: a state dict nested under ``"state_dict"``,
            ``"model"`` (and similar) keys as training scripts save it, keys prefixed with ``module.``
            (``DataParallel``/``DistributedDataParallel``), and ``model.features.state_dict()`` (no ``features.``
            prefix). Legacy keys ``denselayerN.norm.1.weight`` are renamed to ``denselayerN.norm1.weight`` (same for
            relu/conv and ``.2``); ``classifier.*`` is ignored; a missing ``num_batches_tracked`` (old checkpoints)
            keeps the model's value.
        model: a ``DeepLabV3`` (its ``backbone`` is loaded) or a ``DenseNet``, built with the densenet121 shape.
        allow_pickle: read a file that holds pickled Python objects (a whole model saved with
            ``torch.save(model)``) with ``weights_only=False``. That runs code from the file: only for files you
            trust. By default such a file is refused with a ValueError saying so.

    Returns:
        ``model`` (loaded in place; the head keeps its initialisation).

    Raises:
        ValueError (naming the file) for a path that is not a file, a file torch cannot read, a file without a
        state dict, or weights of another architecture (counts of missing/unexpected/mismatched keys, with
        examples); ImportError naming ``pip install torch`` when a path is given and torch is missing.
    """
    source = repr(os.fspath(path_or_state_dict)) if isinstance(path_or_state_dict, (str, os.PathLike)) \
        else "the state dict"
    obj = (_read_torch_file(os.fspath(path_or_state_dict), allow_pickle)
           if isinstance(path_or_state_dict, (str, os.PathLike)) else path_or_state_dict)
    state = _find_state_dict(obj, source)
    arrays = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        m = _LEGACY_KEY.match(key)
        arrays[m.group(1) + m.group(2) if m else key] = _host_array(value, key, source)
    backbone = getattr(model, "backbone", model)
    own = backbone.state_dict()
    if not any(k.startswith("features.") for k in arrays) and any("features." + k in own for k in arrays):
        arrays = {"features." + k: v for k, v in arrays.items()}     # model.features.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked") and k not in arrays}
    required = {k: v for k, v in own.items() if k not in optional}
    problem = _backbone_mismatch(required, arrays)
    if problem:
        config = getattr(model, "config", None)
        shape = f" (block_config {tuple(config.block_config)}, growth_rate {config.growth_rate})" \
            if hasattr(config, "block_config") else ""
        raise ValueError(f"{_TV_NAME}: {source} does not fit the model's DenseNet backbone{shape}: {problem}")
    backbone.load_state_dict(arrays, strict=False)
    return model


def _read_torch_file(path: str, allow_pickle: bool):
    """What ``torch.load`` returns for ``path`` (on the CPU), or a ValueError/ImportError that says what is wrong."""
    if not os.path.isfile(path):
        what = "a folder, not a file" if os.path.isdir(path) else "not a file (no such file)"
        raise ValueError(f"{_TV_NAME}: {path!r} is {what}; expected a .pth file such as torchvision's "
                         f"densenet121-a639ec97.pth ({TORCHVISION_DENSENET121_URL})")
    try:
        import torch
    except ImportError:
        raise ImportError(f"{_TV_NAME}: reading the .pth file {path!r} needs PyTorch (pip install torch), or pass "
                          "a state dict of NumPy arrays") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if names and all(n.endswith(".npy") for n in names):
            raise ValueError(f"{_TV_NAME}: {path!r} is a NumPy .npz archive, not a PyTorch checkpoint (a minideeplab "
                             "checkpoint loads with minideeplab.io.load_model or io.load)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:   # torch.load raises UnpicklingError, RuntimeError, KeyError, EOFError, ... for bad files
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused and not allow_pickle:
            raise ValueError(f"{_TV_NAME}: {path!r} holds a pickled Python object ({refused.group(1)}), e.g. a whole "
                             "model saved with torch.save(model), not a state dict, and weights_only loading refuses "
                             "it. Re-save it with torch.save(model.state_dict(), path), or pass allow_pickle=True "
                             "if you trust the file (unpickling runs code from it)") from None
        if isinstance(e, ModuleNotFoundError):
            raise ValueError(f"{_TV_NAME}: the object pickled in {path!r} needs the module {e.name!r} to load "
                             f"(pip install {e.name.split('.')[0]}), or re-save its state_dict()") from None
        raise ValueError(f"{_TV_NAME}: {path!r} is not a PyTorch checkpoint that torch.load can read "
                         f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, the telling part of torch's long weights-only message, cut to ``limit``."""
    text = " ".join(str(e).split())
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    text = detail.group(1) if detail else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def _find_state_dict(obj, source: str) -> dict:
    """The flat ``{key: tensor or array}`` inside what a file held: the object itself, a pickled module's
    ``state_dict()``, or a dict nested under ``state_dict``/``model``/... keys; ``module.`` prefixes removed."""
    for _ in range(4):          # a few levels: {"model": {"state_dict": {...}}} exists in the wild
        if callable(getattr(obj, "state_dict", None)) and not isinstance(obj, dict):
            obj = obj.state_dict()         # a pickled torch.nn.Module (allow_pickle=True)
        if _is_state(obj):
            break
        if not isinstance(obj, dict):
            raise ValueError(f"{_TV_NAME}: {source} holds a {type(obj).__name__}, not a state dict "
                             "(a dict of tensors, as torch.save(model.state_dict(), path) writes)")
        nested = next((obj[k] for k in _NESTED_KEYS if k in obj), None)
        if nested is None:
            keys = [str(k) for k in obj]
            raise ValueError(f"{_TV_NAME}: {source} is a dict of {len(keys)} entries ({_short(keys, 5)}) but neither "
                             f"a state dict of tensors nor one nested under {_short(_NESTED_KEYS, 3)}")
        obj = nested
    else:
        raise ValueError(f"{_TV_NAME}: no state dict found in {source} (nested too deep)")
    state = dict(obj)
    if all(str(k).startswith("module.") for k in state):      # saved from DataParallel / DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _host_array(value, key: str, source: str) -> np.ndarray:
    """A tensor (any device; bfloat16 and other dtypes NumPy lacks become float32) or an array, as NumPy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point() and str(value.dtype) not in ("torch.float16", "torch.float32", "torch.float64"):
            value = value.float()
        return value.numpy()
    if not hasattr(value, "shape"):
        raise ValueError(f"{_TV_NAME}: entry {key!r} of {source} is a {type(value).__name__}, not a tensor or array")
    return np.asarray(value)


def _backbone_mismatch(own: dict, arrays: dict) -> str | None:
    """None when ``arrays`` fits the backbone's keys and shapes; else a short message with counts and examples.
    A file that shares hardly any keys (another architecture altogether, e.g. a ResNet) gets one line saying so."""
    found = [k for k in own if k in arrays]
    if len(found) < len(own) // 2:
        return (f"only {len(found)} of the backbone's {len(own)} keys are in it, which has {len(arrays)} keys; "
                f"not DenseNet-121 weights? (expected e.g. {', '.join(list(own)[:2])}; it has e.g. "
                f"{', '.join(list(arrays)[:3])})")
    return "; ".join(_state_mismatches(own, arrays, limit=3)) or None
