"""Optimizers (SGD, Adam, AdamW) with PyTorch's update rules, and learning-rate schedules.

Optimizers update ``param.data`` in place (references held elsewhere stay valid) from ``param.grad``; their
state (momentum buffers, ``exp_avg``, ``exp_avg_sq``) lives on the parameters' device and dtype.
``state_dict()`` is a flat ``dict[str, numpy.ndarray]`` (host copies, no objects: it goes into an ``.npz``
with ``allow_pickle=False``) and ``load_state_dict`` restores it exactly, so a resumed run continues
bit-identically. As in PyTorch, loading also restores the hyper-parameters (lr, momentum, betas, ...).

The schedules (``PolyLR``, ``CosineLR``, ``ConstantLR``, ``build_scheduler``) are defined in
``lr_scheduler.py`` and exported here.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_numpy

# the schedules live in lr_scheduler.py (file size) and are part of this module's public API
from .lr_scheduler import (
    SCHEDULERS,
    ConstantLR,
    CosineLR,
    LRScheduler,
    PolyLR,
    build_scheduler,
    check_state_kind,
)
from .nn.module import Parameter


class Optimizer:
    """Base class: holds the parameter list, per-parameter state dicts, ``lr`` and the step count."""

    state_names: tuple = ()
    hparam_names: tuple = ()

    def __init__(self, params, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__}: parameter {i} is a {type(p).__name__}, expected a "
                                "Parameter (pass model.parameters())")
        _check_range(type(self).__name__, "lr", lr, 0.0)
        self.lr = float(lr)
        self.steps = 0
        self.state = [dict.fromkeys(self.state_names) for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        raise NotImplementedError

    def _buffer(self, i: int, name: str):
        """The state array ``name`` of parameter i, created as zeros on the parameter's device on first use."""
        if self.state[i][name] is None:
            self.state[i][name] = get_array_module(self.params[i].data).zeros_like(self.params[i].data)
        return self.state[i][name]

    def state_dict(self) -> dict:
        """Flat ``{name: np.ndarray}``: type, lr, steps, hyper-parameters and ``state.<i>.<name>`` arrays."""
        out = {"optimizer": np.array(type(self).__name__), "lr": np.array(self.lr, dtype=np.float64),
               "steps": np.array(self.steps, dtype=np.int64), "num_params": np.array(len(self.params))}
        for name in self.hparam_names:
            out[name] = np.array(getattr(self, name))
        for i, st in enumerate(self.state):
            for name, arr in st.items():
                if arr is not None:
                    out[f"state.{i}.{name}"] = np.array(to_numpy(arr), copy=True)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (arrays are copied onto the parameters' device and dtype)."""
        cls = type(self).__name__
        check_state_kind(cls, state, "optimizer", "optimizer", ("lr", "steps"))
        n = int(np.asarray(state.get("num_params", -1)))
        if n != len(self.params):
            raise ValueError(f"{cls}.load_state_dict: the state has {n} parameters, this optimizer {len(self.params)}")
        allowed = {"optimizer", "lr", "steps", "num_params", *self.hparam_names}
        allowed |= {f"state.{i}.{s}" for i in range(n) for s in self.state_names}
        unexpected = sorted(set(state) - allowed)
        if unexpected:
            raise ValueError(f"{cls}.load_state_dict: unexpected keys {unexpected[:5]}")
        new_state = []
        for i, p in enumerate(self.params):
            st = dict.fromkeys(self.state_names)
            for name in self.state_names:
                key = f"state.{i}.{name}"
                if key in state:
                    arr = state[key]
                    if tuple(np.shape(arr)) != tuple(p.data.shape):
                        raise ValueError(f"{cls}.load_state_dict: {key} has shape {tuple(np.shape(arr))}, "
                                         f"parameter {i} has shape {tuple(p.data.shape)}")
                    st[name] = get_array_module(p.data).array(arr, dtype=p.data.dtype, copy=True)
            new_state.append(st)
        self.state = new_state
        self.lr = float(np.asarray(state["lr"]))
        self.steps = int(np.asarray(state["steps"]))
        for name in self.hparam_names:
            if name in state:
                setattr(self, name, np.asarray(state[name]).item())

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)}" for k in self.hparam_names)
        return f"{type(self).__name__}(lr={self.lr}, {hp}, params={len(self.params)})"


def _check_range(cls: str, name: str, value, low: float, high: float | None = None, high_open=True):
    ok = isinstance(value, (int, float)) and value >= low and (
        high is None or (value < high if high_open else value <= high))
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{cls}: {name} must be {rng}, got {value!r}")


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    ``g = grad + wd * p``; with momentum ``buf = g`` (first step) else ``buf = momentum * buf + (1 - dampening) * g``,
    then ``g = g + momentum * buf`` (Nesterov) or ``g = buf``; finally ``p -= lr * g``.

    Args:
        params: iterable of ``Parameter`` (``model.parameters()``).
        lr: learning rate.
        momentum: momentum factor in [0, 1).
        dampening: dampening of the momentum (0 in the DeepLab recipe; must be 0 for Nesterov).
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty added to the gradient.
    """

    state_names = ("momentum_buffer",)
    hparam_names = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, params, lr: float, momentum: float = 0.0, *, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, lr)
        _check_range("SGD", "momentum", momentum, 0.0, 1.0)
        _check_range("SGD", "dampening", dampening, 0.0, 1.0, high_open=False)
        _check_range("SGD", "weight_decay", weight_decay, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"SGD: Nesterov momentum needs momentum > 0 and dampening = 0, "
                             f"got momentum={momentum}, dampening={dampening}")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)

    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad if self.weight_decay == 0 else p.grad + self.weight_decay * p.data
            if self.momentum != 0:
                buf = self.state[i]["momentum_buffer"]
                if buf is None:
                    buf = self.state[i]["momentum_buffer"] = g.copy()
                else:
                    buf *= self.momentum
                    buf += g if self.dampening == 0 else (1 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            p.data -= self.lr * g
        self.steps += 1


class Adam(Optimizer):
    """Adam with bias correction, as ``torch.optim.Adam`` (``weight_decay`` is an L2 term added to the gradient).

    ``m += (1 - b1) (g - m)``, ``v = b2 v + (1 - b2) g^2``, and with t the step count
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    Args:
        params: iterable of ``Parameter``.
        lr: learning rate.
        betas: decay rates (b1, b2) of the first and second moment averages, each in [0, 1).
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (Adam) or decoupled decay factor (AdamW).
    """

    state_names = ("exp_avg", "exp_avg_sq")
    hparam_names = ("beta1", "beta2", "eps", "weight_decay")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        cls = type(self).__name__
        if len(tuple(betas)) != 2:
            raise ValueError(f"{cls}: betas must be a pair (beta1, beta2), got {betas!r}")
        _check_range(cls, "beta1", betas[0], 0.0, 1.0)
        _check_range(cls, "beta2", betas[1], 0.0, 1.0)
        _check_range(cls, "eps", eps, 0.0)
        _check_range(cls, "weight_decay", weight_decay, 0.0)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def step(self) -> None:
        self.steps += 1
        b1, b2, t = self.beta1, self.beta2, self.steps
        step_size = self.lr / (1 - b1 ** t)
        bias_correction2_sqrt = (1 - b2 ** t) ** 0.5
        xp = get_array_module(self.params[0].data)
        for i, p in enumerate(self.params):
            g = p.grad
            if self.weight_decay != 0:
                if self.decoupled:
                    p.data *= 1 - self.lr * self.weight_decay      # AdamW: decay the weights directly
                else:
                    g = g + self.weight_decay * p.data             # Adam: L2 term in the gradient
            m, v = self._buffer(i, "exp_avg"), self._buffer(i, "exp_avg_sq")
            m += (1 - b1) * (g - m)
            v *= b2
            v += (1 - b2) * (g * g)
            denom = xp.sqrt(v) / bias_correction2_sqrt + self.eps
            p.data -= step_size * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay, as ``torch.optim.AdamW``: ``p *= 1 - lr * wd`` before the Adam step.

    Args: as ``Adam``; ``weight_decay`` defaults to 0.01 as in PyTorch.
    """

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def build_optimizer(name: str, params, lr: float, **kwargs) -> Optimizer:
    """``"sgd"``, ``"adam"`` or ``"adamw"`` with learning rate ``lr``; ``kwargs`` go to the constructor."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[key](params, lr=lr, **kwargs)


__all__ = ["OPTIMIZERS", "SCHEDULERS", "SGD", "Adam", "AdamW", "ConstantLR", "CosineLR", "LRScheduler",
           "Optimizer", "PolyLR", "build_optimizer", "build_scheduler"]
