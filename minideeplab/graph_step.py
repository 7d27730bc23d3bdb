"""The training step and the validation forward replayed as CUDA graphs: what ``Trainer`` runs on a GPU.

On a GPU a DeepLabV3-DenseNet121 training step is some 4,000 kernels, and launching them one by one from Python
costs more than running them (benchmarks/README.md, on an H200: 154 ms eagerly, 21.5 ms as one graph replay).
``CapturedTrainStep`` runs ``Trainer``'s step (forward, loss, backward, optimizer update, learning-rate schedule,
and the step's loss and confusion counts) through ``backend.GraphStep``: the first two steps run eagerly on the
captured path, the third is captured and launched, every later step is one replay. A replay runs what the GPU did
during the capture, with every Python number frozen, so everything that changes from step to step lives in arrays
that stay put, written before each replay:

- the batch: copied into the step's input arrays (``backend.copy_into``); the masks are checked for 0/1 on the
  host first, since the loss cannot read them under capture (``check_binary``);
- dropout masks: drawn ahead into fixed arrays (``Dropout.draw_ahead``) from the same checkpointed Generator, in
  the order forward draws them, so an eager run and a captured one draw the same masks;
- the learning rate and the step counts: ``DeviceCounters`` (lr_scheduler.py) on the device, which the update
  reads and the schedule advances inside the step; the Python numbers are mirrors, advanced after each replay
  (logs, ``state_dict`` and checkpoints read them; a resumed run writes them back into the arrays);
- the outputs: the step writes its loss and confusion counts into a 4-value array, read once after the replay
  (the step's only synchronisation): the loss's finite check (``Trainer``) and the training metrics.

One batch shape is captured (the trainer's loader drops the last, smaller batch, so every training batch has it);
another shape is a ValueError. ``CapturedEvalStep`` replays the eval forward, one graph per input shape (the last,
smaller validation batch gets its own after its own warm-up; nothing is padded). The graphs read the arrays they
were captured with; when the optimizer moves the parameters into new buffers (``load_state_dict``, ``model.to``)
or its hyper-parameters or the schedule's change, the step is captured again.

On the CPU nothing of this runs: ``Trainer`` steps eagerly. The tests run the capture path on the CPU with
``profiler.CountingArray`` standing for device arrays under capture (no host read allowed, each one counted), and a
stand-in for ``GraphStep`` (``tests/test_graph_step.py``).
"""
from __future__ import annotations

import numpy as np

from .backend import GraphStep, copy_into, get_array_module, to_numpy
from .lr_scheduler import DeviceCounters
from .nn import Dropout, sigmoid


def check_binary(masks) -> None:
    """Raise ValueError unless the host array ``masks`` holds only 0 and 1 (the loss's check, which a captured step
    cannot make on the device)."""
    masks = np.asarray(masks)
    bad = (masks != 0) & (masks != 1)
    if bad.any():
        raise ValueError(f"training masks must be binary with values in {{0, 1}}, got {int(bad.sum())} other "
                         f"value(s), e.g. {masks[bad].ravel()[0].item()!r}")


def _recording(layer, order: list):
    """``layer._draw`` that also appends ``layer`` to ``order``: the order in which forward draws dropout masks."""
    draw = layer._draw

    def recorded(shape, dtype):
        order.append(layer)
        return draw(shape, dtype)
    return recorded


class CapturedTrainStep:
    """``Trainer``'s training step run through ``backend.GraphStep`` (see the module docstring).

    Shapes: ``step(images, masks, meter)``: images (N, 3, H, W), masks (N, 1, H, W), host arrays, the same shape at
    every call.

    Args:
        model, loss_fn, optimizer, scheduler: the trainer's; the optimizer's lr and step count move into
            ``DeviceCounters`` (``optimizer.held``) from now on.
        threshold: a pixel counts as predicted foreground when sigmoid(logit) > threshold (``ConfusionMeter``'s rule).
        runner: called with the step function, returns what runs it once per call (``backend.GraphStep``; the tests
            pass a CPU stand-in).
    """

    def __init__(self, model, loss_fn, optimizer, scheduler, threshold: float = 0.5, runner=GraphStep):
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.threshold, self.make_runner = float(threshold), runner
        self.counters = DeviceCounters(optimizer, scheduler)
        self.shape = None           # (images shape, masks shape, dtypes): the one captured
        self.x = self.t = None      # the step's inputs (device arrays that stay put)
        self.out = None             # its outputs: loss, true positives, predicted positives, true foreground
        self.runner = self.frozen = None
        self.dropouts = None        # the dropout layers in the order forward draws masks, known after one step

    def __call__(self, images, masks, meter) -> float:
        """One training step on a host batch; adds its confusion counts to ``meter`` (a ``ConfusionMeter``) and
        returns the loss (checked for being finite by the caller: the update has run by then)."""
        check_binary(masks)
        self._inputs(images, masks)
        steps, t = self.optimizer.steps, self.scheduler.last_step
        self.counters.follow_host()                  # after load_state_dict: the mirrors into the arrays
        if not self.model.training:                  # (after validation; every call would cost ~1-5 ms of host time)
            self.model.train()
        if self.dropouts is None:
            self._first_step()
        else:
            for layer in self.dropouts:
                layer.draw_ahead()
            self.runner()
            for layer in self.dropouts:              # a replay read them without running forward in Python
                layer.ahead_ready = False
        self.counters.advance_host(steps, t)
        loss, tp, predicted, true = to_numpy(self.out).tolist()      # the step's one read
        tp, predicted, true = int(tp), int(predicted), int(true)
        meter.tp += tp
        meter.fp += predicted - tp
        meter.fn += true - tp
        meter.tn += int(np.prod(masks.shape)) - predicted - true + tp
        return loss

    @property
    def captured(self) -> bool:
        return bool(getattr(self.runner, "captured", False))

    def _inputs(self, images, masks) -> None:
        """Copy the batch into the step's input arrays (made at the first call), and make a new runner (a new
        capture) if what the graph baked in has changed."""
        key = (tuple(images.shape), tuple(masks.shape), np.dtype(images.dtype), np.dtype(masks.dtype))
        if self.shape is None:
            like = self.optimizer.params[0].data
            self.x = get_array_module(like).zeros_like(like, shape=images.shape, dtype=images.dtype)
            self.t = get_array_module(like).zeros_like(like, shape=masks.shape, dtype=masks.dtype)
            self.out = get_array_module(like).zeros_like(like, shape=(4,), dtype=np.float64)
            self.shape = key
        elif key != self.shape:
            raise ValueError(f"CapturedTrainStep: captured for batches {self.shape[0]} (masks {self.shape[1]}), got "
                             f"{key[0]} (masks {key[1]}); every training batch must have one shape (drop_last)")
        frozen = self._frozen()
        if self.runner is None or not _same(frozen, self.frozen):
            self.runner, self.frozen = self.make_runner(self._step), frozen
        copy_into(self.x, images)
        copy_into(self.t, masks)

    def _frozen(self) -> tuple:
        """What a graph bakes in besides its arrays' values: the optimizer's flat buffers, its hyper-parameters and
        the schedule's. Parameters whose arrays were replaced (``model.to``: all at once; the first of each group is
        checked, not all 382 at every step) are moved into new flat buffers first (``_flat_groups``)."""
        opt, sched = self.optimizer, self.scheduler
        if not all(opt.params[g.idx[0]].lives_in(*g.views[0]) for g in opt._groups):
            opt._flat_groups()
        return (tuple(g.data for g in opt._groups), tuple(getattr(opt, k) for k in opt.hparam_names),
                sched.base_lr, sched.total_steps, sched.warmup_steps, tuple(getattr(sched, k) for k in sched.extra_names))

    def _first_step(self) -> None:
        """The first step (eager, on the captured path): forward draws its own masks, and the order in which the
        dropout layers draw them is recorded; each gets its array for masks drawn ahead."""
        layers = [m for m in self.model.modules() if isinstance(m, Dropout)]
        order = []
        for layer in layers:
            layer._draw = _recording(layer, order)       # an instance attribute over the method, for one step
        try:
            self.runner()
        finally:
            for layer in layers:
                del layer._draw
        self.dropouts = list(dict.fromkeys(order))
        for layer in self.dropouts:
            if layer.ahead is None:                        # (draw_ahead falls back to it after an eval forward)
                layer.ahead = get_array_module(layer.scale_mask).empty_like(layer.scale_mask)

    def _step(self) -> None:
        """The captured work, reading ``x``, ``t`` and the counters, writing the parameters, the optimizer's and the
        batch norms' state, the counters and ``out``."""
        self.optimizer.zero_grad()
        logits = self.model(self.x)
        loss = self.loss_fn(logits, self.t)
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.optimizer.step()
        self.scheduler.step()
        xp = get_array_module(logits)
        predicted, true = sigmoid(logits) > self.threshold, self.t == 1
        self.out[:1] = loss.reshape(1)           # (slices: an element assignment converts a NumPy value on the host)
        self.out[1:] = xp.stack([xp.sum(predicted & true), xp.sum(predicted), xp.sum(true)])


class CapturedEvalStep:
    """The model's eval forward replayed as a CUDA graph, one per input shape (each after its own two warm-up
    forwards): what validation runs on a GPU. Called as the model is (``evaluate(CapturedEvalStep(model), loader)``);
    ``eval()`` puts the model in eval mode. The logits it returns are the graph's output array: read them (loss,
    metrics) before the next call overwrites them.

    Shapes: x (N, 3, H, W) on the model's device -> logits (N, 1, H, W).

    Args:
        model: the network (its parameters' arrays are checked at every call: new ones, new captures).
        runner: as ``CapturedTrainStep``'s.
    """

    def __init__(self, model, runner=GraphStep):
        self.model, self.make_runner = model, runner
        self.graphs = {}            # (shape, dtype) -> _EvalGraph
        self.arrays = None          # the parameters' arrays the graphs read

    def eval(self) -> CapturedEvalStep:
        self.model.eval()
        return self

    def __call__(self, x):
        arrays = tuple(p.data for p in self.model.parameters())
        if not _same(arrays, self.arrays):
            self.graphs, self.arrays = {}, arrays
        key = (tuple(x.shape), np.dtype(x.dtype))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _EvalGraph(self.model, x, arrays[0], self.make_runner)
        copy_into(graph.x, x)
        self.model.eval()
        graph.runner()
        return graph.logits


class _EvalGraph:
    """One input shape's input array, runner and output (the logits of the last forward it ran)."""

    def __init__(self, model, x, like, make_runner):
        self.model, self.logits = model, None
        self.x = get_array_module(like).zeros_like(like, shape=x.shape, dtype=x.dtype)
        self.runner = make_runner(self.forward)

    def forward(self) -> None:
        self.logits = self.model(self.x)


def _same(a, b) -> bool:
    """Whether ``a`` and ``b`` (nested tuples) hold the very same arrays (identity) and equal other values."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape"):
        return a is b
    return a == b
