"""One gradient checker for every layer, loss and model: hand-written backward vs central differences.

For a module ``f`` with input ``x`` and a random upstream gradient ``dout`` we define the scalar
``L = sum(f(x) * dout)``; backward(dout) must then return dL/dx and put dL/dθ into each ``param.grad``.
Each entry is compared with ``(L(θ + ε) - L(θ - ε)) / 2ε`` in float64.

Error measure, per tensor: ``max_i |a_i - n_i| / max(|a_i|, |n_i|, floor)`` with a = analytic,
n = numeric and ``floor = 1e-3 * max_i |n_i|``: a true relative error for every entry of meaningful size,
while entries a thousand times smaller than the tensor's largest gradient (exact zeros, cancellations)
are judged against that floor instead of against their own rounding noise. The floor is never below
``noise / rtol`` with ``noise = machine_eps * sum|f(x) * dout| / eps``, the roundoff of the difference
quotient: a tensor whose true gradient is exactly zero (a conv bias followed by batch norm) is then
judged against what central differences can resolve.

Kinks (``kink_aware=True``). ReLU and max pooling are not differentiable everywhere: when the ±ε step of an entry
moves some activation across zero (or changes a max pool's winner), the central difference averages two slopes and
disagrees with the exact gradient although the backward is right. Such an entry shows itself by its one-sided
differences, ``(L(θ+ε) − L(θ))/ε`` and ``(L(θ) − L(θ−ε))/ε``: on a smooth stretch they agree up to ε·L'', across a
kink they differ by a fraction of the jump in slope, and on a piecewise-linear stretch with one kink the central
difference misses the exact derivative by half their difference, while the exact derivative equals the one-sided
difference taken on the kink-free side. An entry that fails is left out of the tensor's error, and counted in
``kinks``, only when it looks like that: its one-sided differences differ by more than ``2·rtol`` (the error's scale)
and the analytic value sits at one end of them (within a quarter of their difference). A steep but smooth loss puts
the exact derivative in their middle instead, and is not excused. A wrong backward still fails: on every entry whose
step crosses no kink (which entries those are depends only on the loss, never on the backward under test), and on a
kink entry when the analytic value matches neither side. A tensor with more than half of its checked entries left
out fails (it was not checked). A small ε (1e-6) makes crossings rare; ``L(θ)`` is computed once: one more forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, to_numpy


@dataclass
class TensorCheck:
    name: str
    shape: tuple
    checked: int
    max_abs_err: float
    max_rel_err: float
    kinks: int = 0         # entries left out: their ±eps step crossed a kink (kink_aware checks only)

    @property
    def ok(self) -> bool:
        """Within ``rtol`` (checked by the result) and at most half of the entries left out as kinks."""
        return 2 * self.kinks <= self.checked


@dataclass
class GradCheckResult:
    """Per-tensor worst errors of one check. ``str(result)`` is a readable table."""
    rows: list = field(default_factory=list)
    rtol: float = 1e-6

    @property
    def worst(self) -> float:
        return max((r.max_rel_err for r in self.rows), default=0.0)

    @property
    def passed(self) -> bool:
        return all(r.max_rel_err <= self.rtol and r.ok for r in self.rows)

    @property
    def kinks(self) -> int:
        """Entries left out of a kink-aware check because their central difference straddled a kink."""
        return sum(r.kinks for r in self.rows)

    def table(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        kinks = any(r.kinks for r in self.rows)
        lines = [f"{'tensor':<{width}}  {'shape':<20} {'checked':>7}  {'max abs err':>11}  {'max rel err':>11}  "
                 + ("kinks  " if kinks else "") + "ok"]
        for r in self.rows:
            ok = "yes" if r.max_rel_err <= self.rtol and r.ok else "NO"
            lines.append(f"{r.name:<{width}}  {str(r.shape):<20} {r.checked:>7}  {r.max_abs_err:11.2e}  "
                         f"{r.max_rel_err:11.2e}  " + (f"{r.kinks:>5}  " if kinks else "") + ok)
        return "\n".join(lines)

    __str__ = table


def _sample_indices(shape, full_limit, samples, rng, prefer=None):
    size = int(np.prod(shape))   # 1 for a scalar: np.prod(()) == 1
    if size <= full_limit:
        flat = np.arange(size)
    else:
        flat = rng.choice(size, size=samples, replace=False)
        if prefer is not None:   # always include the largest analytic entry
            flat = np.unique(np.append(flat, prefer))
    return [np.unravel_index(i, shape) for i in flat]   # () for a scalar


def _compare(name, array, analytic, loss, eps, full_limit, samples, rng, noise_floor=0.0, base=None, rtol=1e-6):
    """Central differences of ``loss()`` w.r.t. sampled entries of ``array`` (perturbed in place); with ``base``
    (the unperturbed loss) the entries whose one-sided differences disagree are left out as kinks."""
    a_host = to_numpy(analytic).astype(np.float64)
    idx = _sample_indices(array.shape, full_limit, samples, rng, int(np.argmax(np.abs(a_host))) if a_host.size else None)
    num, ana, jump, side = np.empty(len(idx)), np.empty(len(idx)), np.zeros(len(idx)), np.full(len(idx), np.inf)
    for k, i in enumerate(idx):
        old = float(array[i])
        array[i] = old + eps
        lp = loss()
        array[i] = old - eps
        lm = loss()
        array[i] = old
        num[k], ana[k] = (lp - lm) / (2 * eps), a_host[i]
        if base is not None:     # the one-sided differences: they differ by ~eps·L'' where the loss is smooth
            forward, backward = (lp - base) / eps, (base - lm) / eps
            jump[k], side[k] = forward - backward, min(abs(a_host[i] - forward), abs(a_host[i] - backward))
    abs_err = np.abs(ana - num)
    floor = max(1e-3 * np.max(np.abs(num)) if num.size else 0.0, noise_floor)
    denom = np.maximum(np.maximum(np.abs(ana), np.abs(num)), max(floor, 1e-300))
    rel = abs_err / denom
    # left out: an entry that fails, whose one-sided differences disagree, with the analytic value at one end of
    # them (a kink on the other side of the step), not in their middle (a steep but smooth loss: the central
    # difference's own truncation error, which is not excused)
    kink = (rel > rtol) & (np.abs(jump) > 2 * rtol * denom) & (side <= 0.25 * np.abs(jump) + rtol * denom)
    rel = np.where(kink, 0.0, rel)
    abs_err = np.where(kink, 0.0, abs_err)
    return TensorCheck(name, tuple(array.shape), len(idx), float(abs_err.max(initial=0.0)),
                       float(rel.max(initial=0.0)), int(kink.sum()))


def _rng_modules(module):
    """Modules that draw randomness (dropout): their Generator state is restored before every forward."""
    return [m for m in module.modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]


def check_module(module, inputs, *, rtol: float = 1e-6, eps: float = 1e-5, full_limit: int = 64,
                 samples: int = 12, wrt_inputs=None, rng: np.random.Generator | None = None,
                 raise_on_fail: bool = True, kink_aware: bool = False) -> GradCheckResult:
    """Check ``module.backward`` against central differences for the inputs and every parameter.

    Args:
        module: a float64 module (``module.double()``); its mode (train/eval) is used as it is.
        inputs: one array or a tuple of arrays passed as ``module(*inputs)``.
        rtol: largest allowed relative error (see the module docstring for the measure).
        eps: finite-difference step.
        full_limit: tensors with at most this many entries are checked entry by entry; larger ones on
            ``samples`` random entries plus the entry with the largest analytic gradient.
        wrt_inputs: indices of the inputs to check (default: all); e.g. ``(0,)`` for a loss's logits.
        rng: Generator for ``dout`` and the sampled entries.
        raise_on_fail: raise ``AssertionError`` with the table when an error exceeds ``rtol``.
        kink_aware: leave out (and count, ``TensorCheck.kinks``) the entries whose ±eps step crosses a kink of a
            ReLU or max pool, detected by their one-sided differences (module docstring); for whole networks.

    Returns:
        ``GradCheckResult`` with one row per tensor (``str()`` prints the table).
    """
    rng = rng if rng is not None else np.random.default_rng(20240607)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    params = list(module.named_parameters())
    for name, p in params:
        if p.data.dtype != np.float64:
            raise TypeError(f"check_module: parameter {name} is {p.data.dtype}; gradient checks run in float64 "
                            "(call module.double())")
    for i, x in enumerate(inputs):
        if x.dtype.kind == "f" and x.dtype != np.float64:
            raise TypeError(f"check_module: input {i} is {x.dtype}; gradient checks run in float64")
    wrt = range(len(inputs)) if wrt_inputs is None else wrt_inputs
    saved_state = {k: v.copy() for k, v in module.state_dict().items()}
    rng_mods = _rng_modules(module)
    rng_states = [m.rng.bit_generator.state for m in rng_mods]

    def forward():
        for m, s in zip(rng_mods, rng_states):
            m.rng.bit_generator.state = s
        return module(*inputs)

    out = forward()
    xp = get_array_module(out)
    dout = xp.asarray(rng.standard_normal(np.shape(out)))
    module.zero_grad()
    dxs = module.backward(dout)
    dxs = dxs if isinstance(dxs, tuple) else (dxs,)
    analytic_params = [(name, p, p.grad.copy()) for name, p in params]

    def loss():
        return float(xp.sum(forward() * dout))

    # roundoff of (L(+eps) - L(-eps)) / 2eps, scaled so that an error at that level counts as rtol
    noise_floor = np.finfo(np.float64).eps * float(xp.sum(xp.abs(out * dout))) / eps / rtol
    base = loss() if kink_aware else None
    result = GradCheckResult(rtol=rtol)
    for i in wrt:
        result.rows.append(_compare(f"input{i}" if len(inputs) > 1 else "input", inputs[i], dxs[i], loss, eps,
                                    full_limit, samples, rng, noise_floor, base, rtol))
    for name, p, g in analytic_params:
        result.rows.append(_compare(name, p.data, g, loss, eps, full_limit, samples, rng, noise_floor, base, rtol))
    module.load_state_dict(saved_state)   # undo running-statistics updates made by the extra forwards
    if raise_on_fail and not result.passed:
        raise AssertionError(f"gradient check failed for {type(module).__name__} (rtol={rtol}):\n{result.table()}")
    return result


class _FunctionModule:
    """Adapts ``f(*arrays) -> (out, vjp)`` to the forward/backward protocol ``check_module`` drives."""

    def __init__(self, f):
        self.f, self.vjp = f, None

    def __call__(self, *arrays):
        out, self.vjp = self.f(*arrays)
        return out

    def backward(self, dout):
        grads = self.vjp(dout)
        return grads if isinstance(grads, tuple) else (grads,)

    def named_parameters(self):
        return iter(())

    def modules(self):
        return iter(())

    def zero_grad(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def check_function(f, *arrays, **kwargs) -> GradCheckResult:
    """Check a stateless function ``f(*arrays) -> (out, vjp)`` where ``vjp(dout)`` returns the gradients
    with respect to ``arrays`` (a tuple, or one array for one input). Options as for ``check_module``."""
    return check_module(_FunctionModule(f), arrays, **kwargs)
