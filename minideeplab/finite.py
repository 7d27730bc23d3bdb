"""Finite-value checks: a diverged run is stopped, and NaN never reaches a checkpoint, a running statistic or a mask.

Each check is one reduction and one host read (a sum is NaN or Inf when any term is; a max of absolute values also
gives the magnitude), and is skipped where a host read is not allowed (``backend.can_read``: a step being captured
as a CUDA graph). A sum that overflows float32 counts as not finite: such values are beyond use anyway.
"""
from __future__ import annotations

import math

from .backend import can_read, get_array_module

# A run has diverged when its state holds values beyond this magnitude (see docs/cli.md, "Divergence"). Healthy runs
# keep weights around 1 and batch-norm running variances below ~1e3; 1e12 is a running variance of activations
# whose standard deviation is 1e6 (float32 squares overflow at 1.8e19), and a weight far past where an update of
# any sane learning rate still changes it in float32 (2^-24 relative).
MAX_ABS_STATE = 1e12


class NonFiniteError(ValueError):
    """A value that must be finite is NaN or Inf. ``layer``: the module that found it, when a layer did."""

    def __init__(self, message: str, layer=None):
        super().__init__(message)
        self.layer = layer


class TrainingDiverged(FloatingPointError):
    """A training run stopped because its loss, weights or running statistics became non-finite or exploded."""


def is_finite(x) -> bool:
    """Whether every value of ``x`` is finite, by one sum and one host read; True (unchecked) where ``x`` may not be
    read on the host (``backend.can_read``)."""
    if not can_read(x):
        return True
    return math.isfinite(float(get_array_module(x).sum(x)))


def check_logits(logits, where: str = "") -> None:
    """Raise ``NonFiniteError`` when the model's output holds NaN or Inf (``predict``, ``evaluate``): its weights or
    batch-norm statistics are not finite, typically a checkpoint of a run that diverged.

    Shapes: logits: any (one reduction over all of it)."""
    if not is_finite(logits):
        raise NonFiniteError(f"the model's output (logits) is not finite (NaN or Inf){where}: the checkpoint's "
                             "weights or batch-norm statistics are not finite (a run that diverged?); use an earlier "
                             "checkpoint or train again with a lower --lr")


def unhealthy_arrays(named_arrays, bound: float | None = MAX_ABS_STATE) -> list[str]:
    """Names (with the reason) of the floating-point arrays that hold NaN/Inf or, when ``bound`` is given, a value
    beyond ``bound`` in magnitude. One ``max(|a|)`` per array (NaN propagates through max). Integer arrays and
    empty ones are skipped."""
    bad = []
    for name, a in named_arrays:
        if a is None or a.size == 0 or a.dtype.kind != "f" or not can_read(a):
            continue
        xp = get_array_module(a)
        peak = float(xp.max(xp.abs(a))) if bound is not None else float(xp.sum(a))
        if not math.isfinite(peak):
            bad.append(f"{name} is not finite")
        elif bound is not None and peak > bound:
            bad.append(f"{name} reaches {peak:.3g}")
    return bad
