"""Optimizers (SGD, Adam, AdamW) with PyTorch's update rules, and learning-rate schedules.

Optimizers update ``param.data`` in place from ``param.grad``; their state (momentum buffers, ``exp_avg``,
``exp_avg_sq``) lives on the parameters' device and dtype.

Flat buffers: when an optimizer is built it moves the parameters of each device and dtype into one flat array,
their gradients into another, and keeps its state in flat arrays of the same layout; every ``param.data`` and
``param.grad`` is then a view of its slice (so references to ``param.data`` taken before that no longer follow
it). A step is a handful of whole-buffer operations instead of a handful per parameter: on a GPU, where each
is a kernel launch, 4 instead of 1528 for SGD with momentum on DeepLabV3-DenseNet121's 382 parameters and 14
instead of 5348 for AdamW (``benchmarks/count_ops.py``; ``torch.optim``'s ``foreach`` implementations group
tensors for the same reason). On the CPU the same operations run chunk by chunk (``CPU_CHUNK`` elements, 256 KiB
of float32), each chunk while it is in cache: 23 -> 18 ms (SGD) and 78 -> 53 ms (AdamW) for those 14.9 M
parameters on this 2-core machine. Should a parameter's arrays be replaced later (``model.to(...)``,
``param.grad = ...``), the next step moves them in again, state included.
``state_dict()`` is a flat ``dict[str, numpy.ndarray]`` (host copies, no objects: it goes into an ``.npz``
with ``allow_pickle=False``) and ``load_state_dict`` restores it exactly, so a resumed run continues
bit-identically. As in PyTorch, loading also restores the hyper-parameters (lr, momentum, betas, ...).

The schedules (``PolyLR``, ``CosineLR``, ``ConstantLR``, ``build_scheduler``) are defined in
``lr_scheduler.py`` and exported here, with ``DeviceCounters``: attached as ``optimizer.held``, the step reads the
learning rate and the step count from 0-d device arrays instead of Python numbers (a step captured as a CUDA graph;
``Optimizer._factors``), to the same float32 numbers.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import device_of, get_array_module, launch_bound, to_device, to_numpy

# the schedules live in lr_scheduler.py (file size) and are part of this module's public API
from .lr_scheduler import (
    SCHEDULERS,
    ConstantLR,
    CosineLR,
    DeviceCounters,
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
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError(f"{type(self).__name__}: a parameter appears more than once in the list")
        self.lr = float(lr)
        self.steps = 0
        self.held = None       # DeviceCounters: lr and steps read from device arrays (a captured step), or None
        self.state = [dict.fromkeys(self.state_names) for _ in self.params]
        self._groups = self._pack()

    def zero_grad(self) -> None:
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        """One update of every parameter from its ``grad``: ``_update`` on each chunk of each flat group."""
        self.steps += 1
        if self.held is not None:
            self.held.steps += 1
        for group in self._flat_groups():
            # a parameter's state exists for all parameters or none (load_state_dict checks it, a step sets all)
            fresh = bool(self.state_names) and self.state[group.idx[0]][self.state_names[0]] is None
            if fresh:                    # from now on every state[i][name] is the parameter's slice of the flat one
                for name in self.state_names:
                    for k, i in enumerate(group.idx):
                        self.state[i][name] = group.view(group.state[name], k)
            factors = self._factors(group.data)
            for chunk in group.chunks():
                self._update(group.data[chunk], group.grad[chunk],
                             {name: flat[chunk] for name, flat in group.state.items()}, fresh, factors)

    def _factors(self, like) -> dict:
        """This step's scalars of the update rule (learning rate, bias corrections), computed once per step and
        group: Python floats, or, with ``held`` counters, 0-d arrays of ``like``'s dtype computed on its device
        from ``held.lr`` and ``held.steps`` by the same operations in float64 (the same float32 numbers)."""
        raise NotImplementedError

    def _update(self, p, g, state: dict, fresh: bool, factors: dict) -> None:
        """The update rule on flat arrays (a chunk of a group): ``p`` in place from ``g``; ``state[name]`` is
        updated in place too (zeros if ``fresh``: the optimizer's first step); ``factors`` from ``_factors``."""
        raise NotImplementedError

    def _pack(self) -> list:
        """Move the parameters (and the state) into flat buffers, one ``_FlatGroup`` per device and dtype."""
        by_kind = {}
        for i, p in enumerate(self.params):
            by_kind.setdefault((device_of(p.data), p.data.dtype), []).append(i)
        return [_FlatGroup(self.params, idx, self.state, self.state_names) for idx in by_kind.values()]

    def _flat_groups(self) -> list:
        """The flat groups for a step, moved in again if any parameter's data or grad array was replaced."""
        if not all(g.is_current(self.params) for g in self._groups):
            self._groups = self._pack()
        return self._groups

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
        for name in self.state_names:      # a step updates all parameters: their state exists for all or none
            have = sum(f"state.{i}.{name}" in state for i in range(n))
            if 0 < have < n:
                raise ValueError(f"{cls}.load_state_dict: the state has {name} for {have} of {n} parameters "
                                 "(expected all or none)")
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
        self._groups = self._pack()     # copies the loaded state into the flat buffers
        self.lr = float(np.asarray(state["lr"]))
        self.steps = int(np.asarray(state["steps"]))
        for name in self.hparam_names:
            if name in state:
                setattr(self, name, np.asarray(state[name]).item())

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)}" for k in self.hparam_names)
        return f"{type(self).__name__}(lr={self.lr}, {hp}, params={len(self.params)})"


CPU_CHUNK = 1 << 16   # elements per chunk of a CPU step (256 KiB of float32; benchmarks/README.md)
ALIGN_BYTES = 256     # where each parameter starts in a flat buffer (CuPy's allocator aligns arrays so too)


class _FlatGroup:
    """The parameters ``idx`` (positions in the optimizer's list) of one device and dtype, moved into one flat
    ``data`` and one flat ``grad`` array; ``state[name]`` holds the optimizer state ``name`` in the same layout
    (zeros where a parameter has none yet). ``view(flat, k)`` is the k-th parameter's slice, in its shape.

    Shapes: data, grad, state[name]: (sum of the parameters' sizes, each rounded up to 256 bytes,).
    """

    def __init__(self, params, idx, state, state_names):
        first = params[idx[0]].data
        device = device_of(first)
        self.idx, self.slices, offset = idx, [], 0
        align = max(ALIGN_BYTES // first.itemsize, 1)
        for i in idx:                         # each parameter starts on a 256-byte boundary, as if allocated alone
            self.slices.append((offset, params[i].data.shape))
            offset += -(-params[i].data.size // align) * align
        # like the first parameter: same device, dtype and array type (an ndarray subclass stays one); zeros: the
        # gaps between parameters stay 0 through every update; untouched: a gradient nobody writes (inference)
        # costs no resident memory
        self.data, self.grad = _untouched_zeros(first, offset), _untouched_zeros(first, offset)
        self.views = [(self.view(self.data, k), self.view(self.grad, k)) for k in range(len(idx))]
        for i, (data, grad) in zip(idx, self.views):
            params[i].move_into(data, grad)
        self.state = {}
        for name in state_names:
            flat = self.state[name] = _untouched_zeros(first, offset)
            for k, i in enumerate(idx):
                if state[i][name] is not None:   # kept (from a loaded state, or from before a device move)
                    view = self.view(flat, k)
                    view[...] = to_device(state[i][name], device)
                    state[i][name] = view

    def view(self, flat, k: int):
        start, shape = self.slices[k]
        return flat[start:start + int(np.prod(shape))].reshape(shape)

    def chunks(self):
        """Slices that cover the flat buffers: cache-sized on the CPU (a step's operations on one chunk find it in
        cache; whole 60 MB buffers would stream from memory once per operation), the whole buffer on a GPU."""
        n = self.data.size
        size = n if launch_bound(self.data) else CPU_CHUNK
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def is_current(self, params) -> bool:
        return all(params[i].lives_in(data, grad) for i, (data, grad) in zip(self.idx, self.views))


def _untouched_zeros(like, n: int):
    """n zeros of ``like``'s dtype, device and array type. ``zeros``, not ``zeros_like``: NumPy then takes memory
    that the OS zeroes when first written, so state that no step writes (an optimizer in an eval-only run) costs
    no resident memory."""
    out = get_array_module(like).zeros(n, dtype=like.dtype)
    return out.view(type(like)) if type(like) is not type(out) and isinstance(like, type(out)) else out


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

    def _factors(self, like):
        return {"lr": self.lr if self.held is None else self.held.lr.astype(like.dtype)}

    def _update(self, p, g, state, fresh, factors):
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if fresh:                          # first step: buf = g
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g if self.dampening == 0 else (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= factors["lr"] * g


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

    def _factors(self, like):
        # step size lr / (1 - b1^t), sqrt(1 - b2^t) (sqrt: correctly rounded on every backend, unlike pow(x, 0.5)),
        # AdamW's decay factor 1 - lr * wd; held: the same in float64 arrays, cast as Python floats are
        b1, b2, wd, held = self.beta1, self.beta2, self.weight_decay, self.held
        if held is None:
            t = self.steps
            return {"step_size": self.lr / (1 - b1 ** t), "bias2": math.sqrt(1 - b2 ** t), "decay": 1 - self.lr * wd}
        xp = get_array_module(held.lr)
        factors = {"step_size": held.lr / (1 - xp.power(b1, held.steps)),
                   "bias2": xp.sqrt(1 - xp.power(b2, held.steps)), "decay": 1 - held.lr * wd}
        return {name: value.astype(like.dtype) for name, value in factors.items()}

    def _update(self, p, g, state, fresh, factors):
        b1, b2 = self.beta1, self.beta2
        if self.weight_decay != 0:
            if self.decoupled:
                p *= factors["decay"]                     # AdamW: decay the weights directly, by 1 - lr * wd
            else:
                g = g + self.weight_decay * p             # Adam: L2 term in the gradient
        m, v = state["exp_avg"], state["exp_avg_sq"]      # zeros before the first step
        m += (1 - b1) * (g - m)
        v *= b2
        v += (1 - b2) * (g * g)
        denom = get_array_module(v).sqrt(v) / factors["bias2"] + self.eps
        p -= factors["step_size"] * (m / denom)


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


__all__ = ["OPTIMIZERS", "SCHEDULERS", "SGD", "Adam", "AdamW", "ConstantLR", "CosineLR", "DeviceCounters",
           "LRScheduler", "Optimizer", "PolyLR", "build_optimizer", "build_scheduler"]
