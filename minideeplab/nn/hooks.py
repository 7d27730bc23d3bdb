"""Forward and backward hooks on a ``Module``: watch (or replace) what each layer computes, PyTorch-style.

    handle = model.backbone.features.conv0.register_forward_hook(lambda m, inputs, out: print(out.shape))
    ...
    handle.remove()                       # or: with layer.register_forward_hook(hook): ...

Kinds (each ``register_*`` returns a ``RemovableHandle``; hooks of one kind run in registration order):

* ``register_forward_pre_hook(hook(module, inputs) -> None | new inputs)``: before ``forward``; ``inputs`` is the
  tuple of positional arguments, a returned value replaces it (a non-tuple counts as one argument).
* ``register_forward_hook(hook(module, inputs, output) -> None | new output)``: after ``forward``.
* ``register_full_backward_pre_hook(hook(module, grad_output) -> None | new grad_output)``: before ``backward``;
  ``grad_output = (dout,)``, dL/d(module output).
* ``register_full_backward_hook(hook(module, grad_input, grad_output) -> None | new grad_input)``: after
  ``backward``; ``grad_input`` is what backward returned as a tuple: ``(dx,)`` for a layer, one entry per input for
  ``Concat``, ``(None,)`` where no input gradient is computed (``DeepLabV3.backward(..., input_grad=False)``). A
  returned tuple of the same length replaces it.

Hooks must not modify the arrays they are given (return a replacement instead), and should not keep them: a
fast-tier ``ReLU(inplace=True)`` overwrites its input, the batch norm's output, right after the batch norm's
forward hook has seen it (take statistics or a copy inside the hook, as ``analysis.flow.record_step`` does).

Which modules fire: every module whose ``forward``/``backward`` runs, leaves and containers alike (``Conv2d``,
``BatchNorm2d``, ``Sequential``, ``DenseBlock``, ``DenseLayer``, ``ASPP``, the model itself, ...): each once per
forward and once per backward. ``ModuleList`` has neither, so it never fires. Two fast paths of the fast model
skip their layers' own ``forward``/``backward`` (``models.densenet``): the fused BN → ReLU → 1×1 conv head of a
dense layer or transition, and the dense block's deferred ``norm1`` terms. A head whose batch norm, ReLU or conv
(or, in eval, the folded ``norm2``) carries a hook runs its three layers one by one, and a dense block runs the
plain backward of a layer that, or whose ``norm1``, carries one: the same numbers to float rounding (the tests tie
the paths together), and the hook sees that layer's real input, output and gradients. Register hooks before the
forward they should watch (a forward decides whether a head runs fused).

Cost when no hook is registered: none. Registering the first hook of a module puts a ``_HookedMethod`` on that one
instance (``module.__dict__["forward"]`` or ``["backward"]``), which shadows the class's method: containers calling
``child(x)`` or ``child.backward(dout)`` reach the hooks without knowing about them. Removing the module's last
hook of that side takes it away again, so a module without hooks runs exactly its class's code, and a student
stepping into ``conv.backward`` lands in ``Conv2d.backward`` (one ``_HookedMethod.__call__`` frame on the way while
the conv has hooks).

CUDA graphs: a hook is Python, and a graph replays the GPU work only (``backend.cuda_graph``): a hooked module run
while a graph is being captured (or warmed up for one) raises a RuntimeError. Remove the hooks before capturing.
"""
from __future__ import annotations

import itertools
import weakref

from ..backend import capturing

KINDS = ("forward_pre", "forward", "backward_pre", "backward")
_ids = itertools.count()


class RemovableHandle:
    """What ``register_*_hook`` returns: ``remove()`` takes the hook away (again: a no-op); usable as a context
    manager (``with layer.register_forward_hook(h): ...`` removes it on leaving)."""

    def __init__(self, module, kind: str, key: int):
        self._module, self.kind, self.id = weakref.ref(module), kind, key

    def remove(self) -> None:
        module = self._module()
        if module is not None:
            remove_hook(module, self.kind, self.id)

    def __enter__(self) -> RemovableHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        module = self._module()
        return f"RemovableHandle({self.kind} hook {self.id} on {type(module).__name__ if module else 'a freed module'})"


class HookSet:
    """The hooks of one module instance (``module._hooks``; the class default is None: no hooks), by kind, in
    registration order."""

    def __init__(self):
        self.forward_pre: dict = {}
        self.forward: dict = {}
        self.backward_pre: dict = {}
        self.backward: dict = {}

    def side(self, method: str) -> bool:
        """Whether any hook runs around ``method`` ("forward" or "backward")."""
        return bool(getattr(self, method + "_pre") or getattr(self, method))

    def __bool__(self) -> bool:
        return self.side("forward") or self.side("backward")


def add_hook(module, kind: str, hook) -> RemovableHandle:
    """Register ``hook`` of ``kind`` (one of ``KINDS``) on ``module``; ``Module.register_*_hook`` call this."""
    if not callable(hook):
        raise TypeError(f"{type(module).__name__}.register_{kind}_hook: expected a callable "
                        f"hook(module, ...), got {type(hook).__name__}")
    hooks = module.__dict__.get("_hooks")
    if hooks is None:
        hooks = module.__dict__["_hooks"] = HookSet()
    key = next(_ids)
    getattr(hooks, kind)[key] = hook
    method = kind.split("_")[0]
    current = module.__dict__.get(method)
    if not (isinstance(current, _HookedMethod) and current.module is module):
        # shadow the class's method on this instance (or wrap what shadows it already, e.g. a profiler's timer)
        module.__dict__[method] = _HookedMethod(module, method, current)
    return RemovableHandle(module, kind, key)


def remove_hook(module, kind: str, key: int) -> None:
    """Take hook ``key`` of ``kind`` off ``module``; the last one of a side takes the ``_HookedMethod`` away."""
    hooks = module.__dict__.get("_hooks")
    if hooks is None or getattr(hooks, kind).pop(key, None) is None:
        return                                            # removed already
    method = kind.split("_")[0]
    current = module.__dict__.get(method)
    if not hooks.side(method) and isinstance(current, _HookedMethod) and current.module is module:
        # (if something wrapped it since, it stays in that chain and calls what it replaced, running no hook)
        if current.replaced is None:
            del module.__dict__[method]
        else:
            module.__dict__[method] = current.replaced
    if not hooks:
        del module.__dict__["_hooks"]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _checked(module, kind: str, value, expected: int) -> tuple:
    """A hook's replacement of ``expected`` entries as a tuple, or a ValueError naming the module."""
    value = _as_tuple(value)
    if len(value) != expected:
        raise ValueError(f"{type(module).__name__} {kind} hook: returned {len(value)} gradients for {expected} "
                         f"(return a tuple shaped like the one it was given, or None to keep it)")
    return value


class _HookedMethod:
    """A module's ``forward`` or ``backward`` while hooks are registered on it: runs them around the method it
    shadows (``replaced``: what the instance had before, or None for the class's own method)."""

    def __init__(self, module, method: str, replaced=None):
        self.module, self.method, self.replaced = module, method, replaced

    def __call__(self, *args, **kwargs):
        module = self.module
        inner = self.replaced or getattr(type(module), self.method).__get__(module, type(module))
        hooks = module.__dict__.get("_hooks")
        if hooks is None or not hooks.side(self.method):
            return inner(*args, **kwargs)
        if capturing():
            raise RuntimeError(f"{type(module).__name__}.{self.method}: hooks are registered on it, and a CUDA graph "
                               "is being captured (or warmed up): a graph replays GPU work only, never the hooks' "
                               "Python. Remove the hooks (handle.remove()) before backend.cuda_graph")
        if self.method == "forward":
            return self._forward(module, hooks, inner, args, kwargs)
        return self._backward(module, hooks, inner, args, kwargs)

    @staticmethod
    def _forward(module, hooks, inner, args, kwargs):
        for hook in list(hooks.forward_pre.values()):
            new = hook(module, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        output = inner(*args, **kwargs)
        for hook in list(hooks.forward.values()):
            new = hook(module, args, output)
            if new is not None:
                output = new
        return output

    @staticmethod
    def _backward(module, hooks, inner, args, kwargs):
        # grad_output: backward's first argument, dL/d(output) (a loss's ``dout`` may come as a keyword, or not at all)
        if args:
            grad_output, rest = args[:1], args[1:]
        elif "dout" in kwargs:
            grad_output, rest = (kwargs.pop("dout"),), ()
        else:
            grad_output, rest = (), ()
        for hook in list(hooks.backward_pre.values()):
            new = hook(module, grad_output)
            if new is not None:
                grad_output = _checked(module, "backward pre", new, len(grad_output))
        result = inner(*grad_output, *rest, **kwargs)
        several = isinstance(result, tuple)      # Concat returns one gradient per input
        grad_input = result if several else (result,)
        for hook in list(hooks.backward.values()):
            new = hook(module, grad_input, grad_output)
            if new is not None:
                grad_input = _checked(module, "backward", new, len(grad_input))
        return grad_input if several else grad_input[0]

    def __repr__(self) -> str:
        return f"<{type(self.module).__name__}.{self.method} with hooks>"
