"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is one ``.npz`` written atomically by ``io.write_npz`` (temporary file + ``os.replace``):

- arrays ``model.<state-dict key>`` (parameters and buffers), ``optimizer.<key>`` and ``scheduler.<key>`` (their
  flat ``state_dict()``), and ``extra.<name>`` (e.g. the current epoch's data order);
- the JSON meta record: ``kind`` (``CHECKPOINT_KIND``), the model config, the training config, counters (epoch,
  step), the states of every ``numpy.random.Generator`` (data order, augmentation, dropout), the history and the
  best score so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .io import load_model_and_meta, read_npz, write_npz

CHECKPOINT_KIND = "minideeplab-train-checkpoint"
_PREFIXES = ("model.", "optimizer.", "scheduler.", "extra.")


def generator_state(rng: np.random.Generator) -> dict:
    """The JSON-able state of a Generator (``bit_generator.state``; Python ints keep all 128 bits in JSON)."""
    return rng.bit_generator.state


def set_generator_state(rng: np.random.Generator, state: dict) -> None:
    """Put ``rng`` back into ``state`` (as returned by ``generator_state``), in place."""
    kind = type(rng.bit_generator).__name__
    if state.get("bit_generator") != kind:
        raise ValueError(f"checkpoint: generator state is for {state.get('bit_generator')!r}, not {kind!r}")
    rng.bit_generator.state = state


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the state dicts and the meta record."""
    path: str
    model_state: dict
    optimizer_state: dict = field(default_factory=dict)
    scheduler_state: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def save_checkpoint(path, model, optimizer=None, scheduler=None, meta: dict | None = None,
                    extra: dict | None = None) -> None:
    """Write model, optimizer and scheduler state plus ``meta`` (JSON) and ``extra`` arrays to ``path`` atomically.

    Args:
        path: destination ``.npz``.
        model: a ``Module`` (its ``config`` attribute, when set, is stored as ``meta["model_config"]``).
        optimizer, scheduler: objects with ``state_dict()`` returning flat ``{name: array}`` dicts, or None.
        meta: JSON-able dict (counters, generator states, history, training config).
        extra: more arrays to store, e.g. ``{"epoch_order": order}``.
    """
    arrays = {}
    for prefix, state in (("model.", model.state_dict()),
                          ("optimizer.", optimizer.state_dict() if optimizer is not None else {}),
                          ("scheduler.", scheduler.state_dict() if scheduler is not None else {}),
                          ("extra.", extra or {})):
        for k, v in state.items():
            arrays[prefix + k] = v
    meta = dict(meta or {})
    meta["kind"] = CHECKPOINT_KIND
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["model_config"] = config.to_dict()
    write_npz(path, arrays, meta)


def load_checkpoint(path) -> Checkpoint:
    """Read a file written by ``save_checkpoint``.

    Raises:
        ValueError naming the file when it is missing, corrupt, or not a minideeplab training checkpoint.
    """
    arrays, meta = read_npz(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{str(path)!r} is not a minideeplab training checkpoint (kind={meta.get('kind')!r}); "
                         "weights-only files from io.save load with minideeplab.io.load_model")
    parts = {p: {} for p in _PREFIXES}
    for k, v in arrays.items():
        prefix = next((p for p in _PREFIXES if k.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{str(path)!r}: unexpected array {k!r} in a training checkpoint")
        parts[prefix][k[len(prefix):]] = v
    return Checkpoint(str(path), parts["model."], parts["optimizer."], parts["scheduler."], parts["extra."], meta)


def load_model(path, device: str = "cpu"):
    """Rebuild the model stored in a training checkpoint (or a weights file from ``io.save``), in eval mode.

    Returns:
        ``(model, meta)``.
    """
    model, meta = load_model_and_meta(path)
    return model.to(device).eval(), meta
