"""Learning-rate schedules: poly (DeepLab), cosine, constant, each with an optional linear warm-up.

A schedule sets ``optimizer.lr`` once per iteration: call ``optimizer.step()`` then ``scheduler.step()``.
Iteration t (0-based) runs with ``lr(t)``; with ``warmup_steps = W`` the first W iterations ramp linearly,
``lr(t) = base * (t + 1) / W``, and the decay then runs over the remaining ``S = T - W`` steps with
``s = t - W``. ``state_dict()`` is a flat dict of NumPy arrays (npz-friendly). Import from
``minideeplab.optim``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .optim import Optimizer


def check_state_kind(owner: str, state: dict, kind_key: str, what: str, required) -> None:
    """Raise ValueError naming ``owner`` when ``state`` was saved by another kind of ``what`` (its ``kind_key``
    entry) or lacks a ``required`` key. Shared by the schedules' and the optimizers' ``load_state_dict``."""
    kind = str(np.asarray(state.get(kind_key, "")))
    if kind != owner:
        raise ValueError(f"{owner}.load_state_dict: the state is from {what} {kind or '(missing)'!r}, not {owner}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{owner}.load_state_dict: missing keys {missing}")


def _check_nonneg(cls: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{cls}: {name} must be a number >= 0, got {value!r}")


class LRScheduler:
    """Base schedule: linear warm-up over ``warmup_steps``, then ``_decay(s, S)`` for s = t - W of S = T - W.

    Args:
        optimizer: the optimizer whose ``lr`` it sets; its lr at construction is the base lr.
        total_steps: T, the number of iterations of the run.
        warmup_steps: W, iterations of linear warm-up (0 <= W < T).
    """

    extra_names: tuple = ()     # a subclass's float hyper-parameters, saved by state_dict (e.g. "power")

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0):
        cls = type(self).__name__
        if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
            raise ValueError(f"{cls}: total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(warmup_steps, (int, np.integer)) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"{cls}: warmup_steps must be an int in [0, total_steps={total_steps}), "
                             f"got {warmup_steps!r}")
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.base_lr = float(optimizer.lr)
        self.last_step = 0
        self.optimizer.lr = self.lr_at(0)

    def _decay(self, s: int, span: int) -> float:
        raise NotImplementedError

    def lr_at(self, t: int) -> float:
        """The learning rate of iteration t (0-based)."""
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        return self._decay(min(t - self.warmup_steps, span), span)

    def step(self) -> float:
        """Advance one iteration and set (and return) the optimizer's lr."""
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def state_dict(self) -> dict:
        out = {"scheduler": np.array(type(self).__name__), "last_step": np.array(self.last_step, dtype=np.int64),
               "base_lr": np.array(self.base_lr, dtype=np.float64),
               "total_steps": np.array(self.total_steps, dtype=np.int64),
               "warmup_steps": np.array(self.warmup_steps, dtype=np.int64)}
        out.update({k: np.array(getattr(self, k), dtype=np.float64) for k in self.extra_names})
        return out

    def load_state_dict(self, state: dict) -> None:
        check_state_kind(type(self).__name__, state, "scheduler", "schedule",
                         ("last_step", "base_lr", "total_steps", "warmup_steps", *self.extra_names))
        self.last_step = int(np.asarray(state["last_step"]))
        self.base_lr = float(np.asarray(state["base_lr"]))
        self.total_steps = int(np.asarray(state["total_steps"]))
        self.warmup_steps = int(np.asarray(state["warmup_steps"]))
        for k in self.extra_names:
            setattr(self, k, float(np.asarray(state[k])))
        self.optimizer.lr = self.lr_at(self.last_step)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in self.extra_names)
        return (f"{type(self).__name__}(base_lr={self.base_lr}, total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps}{extra}, last_step={self.last_step})")


class PolyLR(LRScheduler):
    """The DeepLab "poly" schedule: ``lr(t) = base * (1 - s/S) ** power`` (s, S after warm-up; without
    warm-up ``base * (1 - t/T) ** power``); 0 from t = T on."""

    extra_names = ("power",)

    def __init__(self, optimizer: Optimizer, total_steps: int, power: float = 0.9, warmup_steps: int = 0):
        _check_nonneg("PolyLR", "power", power)
        self.power = float(power)
        super().__init__(optimizer, total_steps, warmup_steps)

    def _decay(self, s: int, span: int) -> float:
        return self.base_lr * (1 - s / span) ** self.power


class CosineLR(LRScheduler):
    """Cosine annealing: ``lr(t) = min_lr + (base - min_lr) * (1 + cos(pi * s/S)) / 2``; min_lr from t = T on."""

    extra_names = ("min_lr",)

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0):
        _check_nonneg("CosineLR", "min_lr", min_lr)
        if min_lr > optimizer.lr:
            raise ValueError(f"CosineLR: min_lr ({min_lr}) must not exceed the optimizer's lr ({optimizer.lr})")
        self.min_lr = float(min_lr)
        super().__init__(optimizer, total_steps, warmup_steps)

    def _decay(self, s: int, span: int) -> float:
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * s / span)) / 2


class ConstantLR(LRScheduler):
    """The base lr throughout (after the optional warm-up). Unlike ``torch.optim.lr_scheduler.ConstantLR``
    there is no reduced-factor phase."""

    def __init__(self, optimizer: Optimizer, total_steps: int = 1, warmup_steps: int = 0):
        super().__init__(optimizer, max(int(total_steps), warmup_steps + 1), warmup_steps)

    def _decay(self, s: int, span: int) -> float:
        return self.base_lr


SCHEDULERS = {"poly": PolyLR, "cosine": CosineLR, "constant": ConstantLR}


def build_scheduler(name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                    **kwargs) -> LRScheduler:
    """``"poly"``, ``"cosine"`` or ``"constant"``; ``kwargs`` (power, min_lr) go to the constructor."""
    key = str(name).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULERS)}")
    return SCHEDULERS[key](optimizer, total_steps, warmup_steps=warmup_steps, **kwargs)
