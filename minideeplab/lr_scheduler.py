"""Learning-rate schedules: poly (DeepLab), cosine, constant, each with an optional linear warm-up.

A schedule sets ``optimizer.lr`` once per iteration: call ``optimizer.step()`` then ``scheduler.step()``.
Iteration t (0-based) runs with ``lr(t)``; with ``warmup_steps = W`` the first W iterations ramp linearly,
``lr(t) = base * (t + 1) / W``, and the decay then runs over the remaining ``S = T - W`` steps with
``s = t - W``. ``state_dict()`` is a flat dict of NumPy arrays (npz-friendly). Import from
``minideeplab.optim``.

On a GPU a training step captured as a CUDA graph cannot read a new Python number each step, so the learning rate
and the step counts can live in 0-d device arrays instead (``DeviceCounters``): the optimizer's update reads them
there, and ``step()`` advances them there too, with ``lr_of(t)``, the schedule's formula as array arithmetic.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .backend import get_array_module

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

    def lr_of(self, t):
        """``lr_at(t)`` as array arithmetic on ``t``, a float64 array (0-d: a device-held step count), on its device:
        the same operations in the same order, so equal to ``lr_at`` on NumPy (``tests/test_graph_step.py`` checks
        every t of a run) and to the rounding of the device's ``pow``/``cos`` on a GPU."""
        xp = get_array_module(t)
        W, span = self.warmup_steps, self.total_steps - self.warmup_steps
        lr = self._decay_of(xp, xp.minimum(t - W, span), span)
        if W:
            lr = xp.where(t < W, self.base_lr * (t + 1) / W, lr)
        return lr

    def _decay_of(self, xp, s, span: int):
        """``_decay`` on an array ``s``."""
        raise NotImplementedError

    def step(self) -> float:
        """Advance one iteration and set (and return) the optimizer's lr (and, when the optimizer's counters are
        held on its device, ``DeviceCounters``, advance them there: a captured step's schedule)."""
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        held = getattr(self.optimizer, "held", None)
        if held is not None:
            held.t += 1
            held.lr[...] = self.lr_of(held.t)
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

    def _decay_of(self, xp, s, span):
        return self.base_lr * xp.power(1 - s / span, self.power)


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

    def _decay_of(self, xp, s, span):
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + xp.cos(math.pi * s / span)) / 2


class ConstantLR(LRScheduler):
    """The base lr throughout (after the optional warm-up). Unlike ``torch.optim.lr_scheduler.ConstantLR``
    there is no reduced-factor phase."""

    def __init__(self, optimizer: Optimizer, total_steps: int = 1, warmup_steps: int = 0):
        super().__init__(optimizer, max(int(total_steps), warmup_steps + 1), warmup_steps)

    def _decay(self, s: int, span: int) -> float:
        return self.base_lr

    def _decay_of(self, xp, s, span):
        return xp.zeros_like(s) + self.base_lr


SCHEDULERS = {"poly": PolyLR, "cosine": CosineLR, "constant": ConstantLR}


def build_scheduler(name: str, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                    **kwargs) -> LRScheduler:
    """``"poly"``, ``"cosine"`` or ``"constant"``; ``kwargs`` (power, min_lr) go to the constructor."""
    key = str(name).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULERS)}")
    return SCHEDULERS[key](optimizer, total_steps, warmup_steps=warmup_steps, **kwargs)


class DeviceCounters:
    """The optimizer's step count and learning rate, and the schedule's step, held in 0-d float64 arrays on the
    parameters' device, for a training step captured as a CUDA graph (``graph_step.CapturedTrainStep``).

    A graph replays the kernels it captured with every Python number frozen, so a step that reads ``optimizer.lr``
    and ``optimizer.steps`` as Python numbers would train at the captured step's learning rate forever. Attached
    (``optimizer.held``), the update reads ``lr`` and ``steps`` from these arrays (``Optimizer._factors``) and
    ``scheduler.step()`` advances ``t`` and ``lr`` there (``lr_of``): a replay advances the schedule itself.

    The Python numbers stay, as host mirrors: ``state_dict``, logs and checkpoints read them. Code that runs the
    step without running its Python (a replay) calls ``advance_host`` after it; ``follow_host`` (before a step)
    writes the mirrors into the arrays when something else changed them (``load_state_dict`` on resume), the
    learning rate computed from ``t`` by ``lr_of`` on the device, as every step computes it (a resumed run then
    continues bit for bit what the uninterrupted run computes).

    Shapes: steps, t, lr: () float64, on the device (and of the array type) of the optimizer's first parameter.
    """

    def __init__(self, optimizer, scheduler):
        if scheduler.optimizer is not optimizer:
            raise ValueError("DeviceCounters: the scheduler sets the lr of another optimizer")
        like = optimizer.params[0].data
        xp = get_array_module(like)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.steps, self.t, self.lr = (xp.zeros_like(like, shape=(), dtype=np.float64) for _ in range(3))
        self.held_at = None       # the host values (steps, t, lr) that the arrays hold
        optimizer.held = self
        self.follow_host()

    def host_values(self) -> tuple:
        return self.optimizer.steps, self.scheduler.last_step, self.optimizer.lr

    def follow_host(self) -> None:
        """Write the host mirrors into the arrays if they changed since the arrays last matched them."""
        steps, t, lr = now = self.host_values()
        if now == self.held_at:
            return
        self.steps[...] = float(steps)
        self.t[...] = float(t)
        if lr == self.scheduler.lr_at(t):
            self.lr[...] = self.scheduler.lr_of(self.t)
        else:                     # an lr set by hand, not by the schedule
            self.lr[...] = float(lr)
        self.held_at = now

    def advance_host(self, steps: int, t: int) -> None:
        """The mirrors after one step from ``(steps, t)``: what the step advanced on the device."""
        self.optimizer.steps, self.scheduler.last_step = steps + 1, t + 1
        self.optimizer.lr = self.scheduler.lr_at(t + 1)
        self.held_at = self.host_values()

    def detach(self) -> None:
        """The optimizer reads Python numbers again."""
        if self.optimizer.held is self:
            self.optimizer.held = None
