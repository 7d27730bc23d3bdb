"""A minideeplab training run carried into PyTorch and back: the pieces ``torch_ddp`` puts together.

Imports torch (``import minideeplab`` never imports this module). What carries over from a training checkpoint
(``RUN/last.npz``, ``RUN/best.npz``), and how:

- weights and batch-norm statistics: the same state-dict keys (``torch_oracle.to_torch``);
- the loss: ``torch_loss(cfg.loss)`` rebuilds ``losses.build_loss`` term by term with its hyper-parameters; in
  a run of W processes the batch-global Dice sums are all-reduced (with autograd), so the loss is the one of the
  whole global batch, as in minideeplab (batch-norm statistics stay per process, as in any DDP run without
  ``SyncBatchNorm``);
- the optimizer: ``torch_optimizer`` maps our flat state (``state.<i>.exp_avg`` for the i-th of
  ``model.parameters()``) to torch's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``, or
  ``momentum_buffer``), matching parameters by name, and ``optimizer_state_back`` maps it back: the moments carry
  over exactly, both ways;
- the learning-rate schedule: our own ``LRScheduler`` restored from its state drives torch's ``lr``;
- dropout: ``HostDropout`` draws its masks from the run's NumPy Generator exactly as ``nn.Dropout`` does;
- the data: ``RunOrderDataset`` presents the run's own epoch order (drawn from the checkpointed shuffle
  Generator), so ``DistributedSampler(shuffle=False)`` hands each process its share of the same global batches.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .losses import (
    BCEWithLogitsLoss,
    CombinedLoss,
    DiceLoss,
    FocalLoss,
    HingeLoss,
    SquaredHingeLoss,
    build_loss,
)
from .lr_scheduler import SCHEDULERS


# -- the loss ----------------------------------------------------------------------------------------------------
class _SumOverProcesses(torch.autograd.Function):
    """y = sum of x over the processes (``dist.all_reduce``); its backward sums the upstream gradients the same
    way: every process's loss depends on every process's x."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        torch.distributed.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        torch.distributed.all_reduce(dx)
        return dx


def sum_over_processes(x):
    """A differentiable sum of ``x`` over the processes of the default group (for ``torch_loss(all_reduce=)``).

    Shapes: x (any) -> same."""
    return _SumOverProcesses.apply(x)




def _dice(m: DiceLoss, all_reduce):
    def dice(x, t):
        # L = sum(q) / (sum(p) + sum(t) + s), q = s(+-x) the probability of the wrong class (as losses.DiceLoss)
        dims = tuple(range(1, x.ndim)) if m.per_image and x.ndim > 1 else tuple(range(x.ndim))
        wrong = torch.sigmoid((1 - 2 * t) * x).sum(dims)
        total = torch.sigmoid(x).sum(dims) + t.sum(dims)
        if all_reduce is not None and not m.per_image:   # one Dice over the global batch: sums over processes
            wrong, total = all_reduce(torch.stack([wrong, total]))
        return (wrong / (total + m.smooth)).mean()
    return dice


def _term(m, all_reduce):
    """A torch function (logits, target) -> 0-d loss equal to the minideeplab loss module ``m``."""
    if isinstance(m, BCEWithLogitsLoss) and m.reduction == "mean":
        pw = None if m.pos_weight is None else torch.as_tensor(np.asarray(m.pos_weight))
        return lambda x, t: F.binary_cross_entropy_with_logits(
            x, t, pos_weight=None if pw is None else pw.to(x.device, x.dtype))
    if isinstance(m, DiceLoss):
        return _dice(m, all_reduce)
    if isinstance(m, FocalLoss) and m.reduction == "mean":
        def focal(x, t):      # a_t * q**gamma * softplus(z), z = +-x (losses.FocalLoss)
            z = (1 - 2 * t) * x
            a_t = 1.0 if m.alpha is None else m.alpha * t + (1 - m.alpha) * (1 - t)
            return (a_t * torch.sigmoid(z) ** m.gamma * F.softplus(z)).mean()
        return focal
    if isinstance(m, SquaredHingeLoss) and m.reduction == "mean":
        return lambda x, t: (torch.relu(1 - (2 * t - 1) * x) ** 2).mean()
    if isinstance(m, HingeLoss) and m.reduction == "mean":
        return lambda x, t: torch.relu(1 - (2 * t - 1) * x).mean()   # relu: subgradient 0 at the kink, as ours
    raise ValueError(f"torch_loss: no PyTorch version of {m!r}")


def torch_loss(name: str, all_reduce=None):
    """``build_loss(name)`` in PyTorch: a function ``(logits, target) -> 0-d tensor``, differentiable by autograd.

    Shapes: logits (N, 1, H, W), target (same) -> 0-d.

    Args:
        name: as ``TrainConfig.loss`` ("bce+dice", "focal", ...); the hyper-parameters are read from the modules
            ``build_loss`` returns, so the two stay the same loss.
        all_reduce: a differentiable sum over processes (``sum_over_processes``) for the batch-global Dice sums;
            None in a single process (or to get each process's own Dice). With DDP averaging the gradients over
            W processes, each process's loss ``BCE_r + Dice(global sums)`` then gives exactly the gradient of the
            global batch's ``BCE + Dice``: the sum's backward adds the W copies of dDice, DDP divides by W.
    """
    ours = build_loss(name)
    terms = list(zip(ours.weights, ours.losses)) if isinstance(ours, CombinedLoss) else [(1.0, ours)]
    fns = [(w, _term(m, all_reduce)) for w, m in terms]

    def loss(logits, target):
        total = None
        for w, fn in fns:
            value = w * fn(logits, target)
            total = value if total is None else total + value
        return total
    return loss


# -- dropout and data ----------------------------------------------------------------------------------------------
class HostDropout(nn.Module):
    """Inverted dropout whose masks come from a NumPy Generator, drawn as ``minideeplab.nn.Dropout`` draws them
    (``rng.random(shape) >= p``, times 1/(1-p) in the input's dtype), so a run continues with its own masks.

    Shapes: any -> same.
    """

    def __init__(self, p: float, rng: np.random.Generator):
        super().__init__()
        self.p, self.rng = float(p), rng

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        dtype = torch.empty((), dtype=x.dtype).numpy().dtype
        keep = self.rng.random(tuple(x.shape)) >= self.p
        return x * torch.from_numpy(keep.astype(dtype) / (1 - self.p)).to(x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RunOrderDataset(torch.utils.data.Dataset):
    """A minideeplab dataset seen in the run's order: item j is ``dataset[order[start + j]]`` as torch tensors.

    With ``DistributedSampler(shuffle=False, drop_last=True)`` and a per-process batch b, the k-th batches of the
    W processes together are items ``[k*b*W, (k+1)*b*W)`` of the order: the run's k-th global batch.

    Shapes: item -> (image (3, H, W), mask (1, H, W)) float32 tensors.
    """

    def __init__(self, dataset):
        self.dataset, self.positions = dataset, np.arange(0)

    def set_order(self, order, start: int = 0) -> None:
        self.positions = np.asarray(order)[start:]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j):
        image, mask = self.dataset[int(self.positions[j])]
        return torch.from_numpy(image), torch.from_numpy(mask)


# -- optimizer and schedule ----------------------------------------------------------------------------------------
_STATE_NAMES = {"SGD": ("momentum_buffer",), "Adam": ("exp_avg", "exp_avg_sq"), "AdamW": ("exp_avg", "exp_avg_sq")}


def _scalar(state: dict, key: str, default=None):
    return np.asarray(state[key]).item() if key in state else default


def torch_optimizer(params: list, state: dict):
    """A ``torch.optim`` optimizer over ``params`` (torch parameters in the order of our optimizer's list, i.e. of
    ``model.parameters()``) that continues our optimizer whose ``state_dict()`` is ``state``: same kind, learning
    rate, hyper-parameters, step count and per-parameter moments.

    Shapes: ``state["state.<i>.<name>"]`` has the shape of ``params[i]``.
    """
    kind = str(np.asarray(state.get("optimizer", "")))
    if kind not in _STATE_NAMES:
        raise ValueError(f"torch_optimizer: unknown optimizer {kind!r} in the checkpoint (expected SGD, Adam, AdamW)")
    n = int(np.asarray(state.get("num_params", -1)))
    if n != len(params):
        raise ValueError(f"torch_optimizer: the checkpoint's optimizer has {n} parameters, the model {len(params)}")
    lr, wd = float(np.asarray(state["lr"])), float(_scalar(state, "weight_decay", 0.0))
    if kind == "SGD":
        opt = torch.optim.SGD(params, lr=lr, momentum=_scalar(state, "momentum", 0.0), weight_decay=wd,
                              dampening=_scalar(state, "dampening", 0.0), nesterov=bool(_scalar(state, "nesterov", 0)))
    else:
        cls = torch.optim.AdamW if kind == "AdamW" else torch.optim.Adam
        opt = cls(params, lr=lr, betas=(_scalar(state, "beta1"), _scalar(state, "beta2")),
                  eps=_scalar(state, "eps"), weight_decay=wd)
    steps, per_param = int(np.asarray(state["steps"])), {}
    for i in range(len(params)):
        st = {name: torch.from_numpy(np.array(state[f"state.{i}.{name}"])) for name in _STATE_NAMES[kind]
              if f"state.{i}.{name}" in state}
        if st and kind != "SGD":
            st["step"] = torch.tensor(float(steps))   # ours counts steps once; torch keeps a count per parameter
        if st and (kind != "SGD" or opt.defaults["momentum"] != 0):
            per_param[i] = st
    full = opt.state_dict()
    full["state"] = per_param
    opt.load_state_dict(full)       # casts the moments to each parameter's dtype and device
    opt.minideeplab = SimpleNamespace(kind=kind, steps=steps, hparams={k: np.array(v) for k, v in state.items()
                                                                       if k not in ("optimizer", "lr", "steps")
                                                                       and not k.startswith("state.")})
    return opt


def optimizer_state_back(opt, params: list, lr: float) -> dict:
    """Our optimizer's ``state_dict()`` for a torch optimizer made by ``torch_optimizer`` (after its steps):
    what ``Trainer.load_state`` / ``Optimizer.load_state_dict`` read. ``lr``: the current learning rate."""
    info = opt.minideeplab
    out = {"optimizer": np.array(info.kind), "lr": np.array(lr, dtype=np.float64),
           "steps": np.array(info.steps, dtype=np.int64), **info.hparams}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for name in _STATE_NAMES[info.kind]:
            if st.get(name) is not None:
                out[f"state.{i}.{name}"] = st[name].detach().cpu().numpy().copy()
        if "step" in st and int(st["step"]) != info.steps:
            raise RuntimeError(f"optimizer_state_back: parameter {i} took {int(st['step'])} steps, "
                               f"the optimizer {info.steps}")
    return out


def restore_schedule(state: dict):
    """Our learning-rate schedule at the position ``state`` (its ``state_dict()``) records, driving a stand-in
    optimizer whose ``lr`` the training loop copies into torch's parameter groups before each step."""
    kinds = {cls.__name__: cls for cls in SCHEDULERS.values()}
    kind = str(np.asarray(state.get("scheduler", "")))
    if kind not in kinds:
        raise ValueError(f"restore_schedule: unknown schedule {kind!r} in the checkpoint (expected {sorted(kinds)})")
    holder = SimpleNamespace(lr=float(np.asarray(state["base_lr"])))
    schedule = kinds[kind](holder, total_steps=int(np.asarray(state["total_steps"])),
                           warmup_steps=int(np.asarray(state["warmup_steps"])))
    schedule.load_state_dict(state)
    return schedule


class FlatState:
    """An object whose ``state_dict()`` is a given dict (what ``checkpoint.save_checkpoint`` asks of an optimizer)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


__all__ = ["FlatState", "HostDropout", "RunOrderDataset", "optimizer_state_back", "restore_schedule",
           "sum_over_processes", "torch_loss", "torch_optimizer"]
