"""Continue a minideeplab training run in PyTorch with ``DistributedDataParallel``, and write it back.

::

    python -m minideeplab.torch_ddp runs/dl121/last.npz --nproc 2              # 2 CPU processes, gloo
    torchrun --nproc_per_node 4 -m minideeplab.torch_ddp runs/dl121/last.npz   # 4 GPUs, NCCL

Each process builds ``torch_oracle.TorchDeepLabV3`` from the checkpoint and continues the run where it stopped: the
same loss, optimizer state, learning-rate schedule position, epoch order, augmentation and dropout Generators
(``torch_run`` says how each carries over). The run's batch of B images is split over the W processes (B / W
each), so the schedule's steps and epochs stay the run's. Rank 0 validates at the end of every epoch as the Trainer
does and writes ``last.npz`` (and ``best.npz`` when the validation IoU improves) into the output folder: training
checkpoints that ``minideeplab evaluate``/``predict`` read and ``minideeplab train --resume`` continues. Imports
torch (``import minideeplab`` never imports this module). The backend follows the device: NCCL on GPUs, gloo on
the CPU. docs/pytorch.md has the details and what does not carry over.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader as TorchLoader
from torch.utils.data import DistributedSampler

from .checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from .data import DataLoader
from .io import atomic_write
from .metrics import COUNT_NAMES, BoundaryMeter, ConfusionMeter
from .models import DeepLabConfig, build_deeplab
from .torch_oracle import to_torch
from .torch_run import (
    FlatState,
    HostDropout,
    RunOrderDataset,
    optimizer_state_back,
    restore_schedule,
    sum_over_processes,
    torch_loss,
    torch_optimizer,
)
from .train import TrainConfig, build_datasets


def free_port() -> int:
    """A TCP port that is free on this machine now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generator(state: dict, jump: int = 0) -> np.random.Generator:
    """The run's Generator in ``state``; process r > 0 gets it jumped r times (2^127 draws apart: its own stream)."""
    rng = np.random.default_rng()
    set_generator_state(rng, state)
    return rng if jump == 0 else np.random.Generator(rng.bit_generator.jumped(jump))


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("torch_ddp: --device cuda, but PyTorch sees no GPU")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"torch_ddp: device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def check_run(checkpoint, world: int):
    """``(checkpoint, TrainConfig)`` of a run that ``world`` processes can continue, or a ValueError saying why not
    (not a training checkpoint, a finished run, a batch that does not split into ``world`` parts of 2 or more)."""
    ckpt = load_checkpoint(checkpoint)      # ValueError naming the file for anything but a training checkpoint
    meta = ckpt.meta
    if "train_config" not in meta or "model_config" not in meta:
        raise ValueError(f"{str(checkpoint)!r} has no training config; continue a run from RUN/last.npz")
    cfg = TrainConfig.from_dict(meta["train_config"])
    if int(meta["epoch"]) >= cfg.epochs:
        raise ValueError(f"{str(checkpoint)!r}: the run is complete ({meta['epoch']} of {cfg.epochs} epochs)")
    B = cfg.batch_size
    if B % world or B // world < 2:
        raise ValueError(f"torch_ddp: the run's batch of {B} images does not split into {world} processes of at "
                         f"least 2 images each (batch norm needs 2); process counts that fit: "
                         f"{[w for w in range(1, B + 1) if B % w == 0 and B // w >= 2]}")
    return ckpt, cfg


def run(checkpoint, out=None, steps: int | None = None, device: str = "auto", log=print, log_every: int = 10,
        replica_dir=None) -> dict:
    """This process's part of the run; rank and world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Returns a summary: steps, the global batch loss of each step, where rank 0 wrote.

    Args:
        checkpoint: a minideeplab training checkpoint (``RUN/last.npz`` or ``RUN/best.npz``).
        out: folder for ``last.npz``/``best.npz`` (default: the checkpoint's folder, as ``train --resume``).
        steps: stop after this many steps (default: the end of the run, ``TrainConfig.epochs``).
        device: "auto" (a GPU when torch sees one), "cpu" or "cuda". log: rank 0's line printer (None: silent).
        replica_dir: every process also writes its weights there (``replica<rank>.npz``), for checking.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank)
    if "OMP_NUM_THREADS" not in os.environ:      # processes on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world, **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        return _Run(checkpoint, out, dev, rank, world, log if rank == 0 else None).train(steps, log_every, replica_dir)
    finally:
        dist.destroy_process_group()


class _Run:
    """The state of one process: the torch model, optimizer, schedule, data and the run's counters."""

    def __init__(self, checkpoint, out, dev, rank, world, log):
        ckpt, self.cfg = check_run(checkpoint, world)
        meta, self.path = ckpt.meta, Path(checkpoint)
        self.dev, self.rank, self.world, self.log = dev, rank, world, log
        self.out = Path(out) if out is not None else self.path.parent
        self.local_batch = self.cfg.batch_size // world
        self.model = build_deeplab(DeepLabConfig.from_dict(meta["model_config"]), rng=np.random.default_rng(0))
        self.model.load_state_dict(ckpt.model_state)
        self.names = [n for n, _ in self.model.named_parameters()]
        rngs = meta["rng"]
        self.shuffle = _generator(rngs["shuffle"])    # the same on every process: the same epoch orders
        self.augment, dropout = _generator(rngs["augment"], rank), _generator(rngs["dropout"], rank)
        self.tmodel = to_torch(self.model).to(dev).train()
        project = self.tmodel.head.aspp.project
        project.dropout = HostDropout(project.dropout.p, dropout)
        tparams = dict(self.tmodel.named_parameters())
        self.params = [tparams[n] for n in self.names]          # our optimizer's order: state.<i> is params[i]
        self.opt = torch_optimizer(self.params, ckpt.optimizer_state)
        self.schedule = restore_schedule(ckpt.scheduler_state)
        self.ddp = DistributedDataParallel(self.tmodel, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.loss_fn = torch_loss(self.cfg.loss, sum_over_processes if world > 1 else None)
        self.val_loss_fn = torch_loss(self.cfg.loss)             # rank 0 alone: no collectives
        self.train_set, self.val_set = build_datasets(self.cfg, self.augment)
        self.view = RunOrderDataset(self.train_set)
        self.steps_per_epoch = len(self.train_set) // self.cfg.batch_size
        self.epoch, self.step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
        self.global_step, self.history, self.best_iou = int(meta["global_step"]), list(meta["history"]), \
            float(meta["best_iou"])
        running = dict(meta["running"])
        self.meter = ConfusionMeter(self.cfg.threshold)
        for k in COUNT_NAMES:
            setattr(self.meter, k, int(running.pop(k)))
        self.running = running
        order = ckpt.extra.get("epoch_order")
        self.epoch_order = None if order is None else np.asarray(order, dtype=np.int64)
        self.dropout = dropout
        self.losses = []

    # -- one step, one epoch ---------------------------------------------------------------------------------
    def step(self, images, masks) -> float:
        start = time.perf_counter()
        x, t = images.to(self.dev, non_blocking=True), masks.to(self.dev, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.optimizer.lr      # lr(t) of this iteration, as the Trainer's schedule sets it
        self.opt.zero_grad(set_to_none=True)
        logits = self.ddp(x)
        loss = self.loss_fn(logits, t)
        loss.backward()                                    # DDP averages the gradients over the processes
        with torch.no_grad():                              # the global batch's loss and confusion counts
            pred, truth = torch.sigmoid(logits) > self.cfg.threshold, t == 1
            stats = torch.stack([v.double() for v in (loss.detach(), (pred & truth).sum(), pred.sum(), truth.sum())])
            dist.all_reduce(stats)
        value, tp, n_pred, n_true = stats.tolist()
        value /= self.world       # each process's loss: its BCE + the global Dice; their mean: the batch's loss
        if not np.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {self.global_step}; lower --lr")
        self.opt.step()
        self.opt.minideeplab.steps += 1
        self.schedule.step()
        m, r = self.meter, self.running
        m.tp, m.fp, m.fn = m.tp + int(tp), m.fp + int(n_pred - tp), m.fn + int(n_true - tp)
        m.tn += self.world * pred.numel() - int(n_pred + n_true - tp)
        r["loss_sum"], r["count"] = r["loss_sum"] + value, r["count"] + 1
        r["seconds"] += time.perf_counter() - start
        self.step_in_epoch, self.global_step = self.step_in_epoch + 1, self.global_step + 1
        self.losses.append(value)
        return value

    def train(self, steps, log_every, replica_dir) -> dict:
        done, saved = 0, True
        steps = float("inf") if steps is None else int(steps)
        while self.epoch < self.cfg.epochs and done < steps:
            if self.epoch_order is None:                   # a new epoch: the order the Trainer would draw
                self.epoch_order, self.step_in_epoch = self.shuffle.permutation(len(self.train_set)), 0
                self.running = {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
                self.meter.reset()
            self.view.set_order(self.epoch_order, self.step_in_epoch * self.cfg.batch_size)
            sampler = DistributedSampler(self.view, self.world, self.rank, shuffle=False, drop_last=True)
            for images, masks in TorchLoader(self.view, self.local_batch, sampler=sampler, drop_last=True):
                loss = self.step(images, masks)
                done, saved = done + 1, False
                if self.log and log_every and self.global_step % log_every == 0:
                    self.log(f"step {self.global_step}/{self.schedule.total_steps}: loss {loss:.4f} "
                             f"lr {self.schedule.optimizer.lr:.2e} ({self.world} processes, {self.dev.type})")
                if done >= steps:
                    break
            if self.step_in_epoch == self.steps_per_epoch:
                self.end_epoch()
                saved = True
        if not saved and self.rank == 0:                   # stopped mid-epoch: the epoch order goes along
            self.save(self.out / "last.npz")
        return self.finish(done, replica_dir)

    def end_epoch(self) -> None:
        if self.rank == 0:
            val = self.validate()
            r = self.running
            row = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.schedule.optimizer.lr,
                   "train_loss": r["loss_sum"] / max(r["count"], 1),
                   "train_iou": self.meter.compute()["iou"] if self.meter.total else 1.0,
                   "val_loss": val["loss"], "seconds": round(r["seconds"], 2),
                   **{f"val_{k}": val[k] for k in ("iou", "dice", "precision", "recall", "accuracy", "boundary_iou")}}
            self.history.append(row)
            if self.log:
                self.log(f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} | val loss "
                         f"{row['val_loss']:.4f} IoU {row['val_iou']:.4f} Dice {row['val_dice']:.4f}")
        self.epoch, self.epoch_order, self.step_in_epoch = self.epoch + 1, None, 0
        if self.rank == 0:
            improved = self.history[-1]["val_iou"] > self.best_iou
            self.best_iou = max(self.best_iou, self.history[-1]["val_iou"])
            self.save(self.out / "last.npz")
            if improved:
                self.save(self.out / "best.npz")

    @torch.no_grad()
    def validate(self) -> dict:
        """``train.evaluate`` on the torch model: the same loader, metrics and per-batch loss."""
        self.tmodel.eval()
        meter, boundary = ConfusionMeter(self.cfg.threshold), BoundaryMeter(self.cfg.threshold)
        loss_sum, batches = 0.0, 0
        for images, masks in DataLoader(self.val_set, self.cfg.batch_size):
            logits = self.tmodel(torch.from_numpy(images).to(self.dev))
            loss_sum += float(self.val_loss_fn(logits, torch.from_numpy(masks).to(self.dev)))
            probs = torch.sigmoid(logits).cpu().numpy()
            meter.update(probs, masks)
            boundary.update(probs, masks)
            batches += 1
        self.tmodel.train()
        return {**meter.compute(), **boundary.compute(), "loss": loss_sum / max(batches, 1)}

    # -- back to minideeplab -----------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """A minideeplab training checkpoint of the run now (atomic): the Trainer's own format and meta."""
        self.model.load_state_dict({k: v.detach().cpu().numpy() for k, v in self.tmodel.state_dict().items()})
        counts = {k: getattr(self.meter, k) for k in COUNT_NAMES}
        meta = {"train_config": self.cfg.to_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "history": self.history, "best_iou": self.best_iou,
                "rng": {"shuffle": generator_state(self.shuffle), "augment": generator_state(self.augment),
                        "dropout": generator_state(self.dropout)},
                "running": {**self.running, **counts},
                "torch_ddp": {"world_size": self.world, "backend": dist.get_backend(), "device": self.dev.type,
                              "torch": torch.__version__, "from": str(self.path)}}
        extra = {"epoch_order": self.epoch_order} if self.epoch_order is not None else {}
        optimizer = FlatState(optimizer_state_back(self.opt, self.params, self.schedule.optimizer.lr))
        save_checkpoint(path, self.model, optimizer, self.schedule, meta, extra)

    def finish(self, done: int, replica_dir) -> dict:
        """Check that the processes hold the same weights (DDP's promise), optionally write each one's."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        reference = flat.clone()
        dist.broadcast(reference, 0)
        diff = (flat - reference).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if replica_dir is not None:
            state = {k: v.detach().cpu().numpy() for k, v in self.tmodel.state_dict().items()}
            with atomic_write(Path(replica_dir) / f"replica{self.rank}.npz") as f:
                np.savez(f, **state)
        if self.log:
            self.log(f"{done} steps on {self.world} processes; weights equal across processes to "
                     f"{float(diff):.1e}; wrote {self.out / 'last.npz'}")
        return {"steps": done, "losses": self.losses, "replica_max_abs_diff": float(diff),
                "last": str(self.out / "last.npz"), "world_size": self.world, "global_step": self.global_step}


def _worker(rank: int, world: int, port: int, args: tuple, kwargs: dict, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        summary = run(*args, **kwargs)
    except (ValueError, FloatingPointError, OSError) as e:     # the same on every process: rank 0 reports it
        if rank == 0:
            queue.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))
        return
    if rank == 0:
        queue.put(("ok", summary))


def launch(checkpoint, nproc: int = 2, **kwargs) -> dict:
    """``run`` in ``nproc`` local processes (``torch.multiprocessing`` spawn, a free MASTER_PORT); returns rank
    0's summary. ``kwargs`` go to ``run``."""
    if nproc < 1:
        raise ValueError(f"torch_ddp: nproc must be >= 1, got {nproc}")
    check_run(checkpoint, nproc)             # refuse a wrong file here, before starting processes
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(nproc, free_port(), (checkpoint,), kwargs, queue), nprocs=nproc, join=True)
    status, value = queue.get()
    if status == "error":
        raise ValueError(value)
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minideeplab.torch_ddp", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a minideeplab training checkpoint (RUN/last.npz or RUN/best.npz)")
    p.add_argument("--out", help="folder for last.npz / best.npz (default: the checkpoint's folder)")
    p.add_argument("--steps", type=int, help="stop after this many steps (default: the end of the run)")
    p.add_argument("--nproc", type=int, default=1, help="local processes to spawn (not under torchrun)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    kwargs = {"out": args.out, "steps": args.steps, "device": args.device, "log_every": args.log_every}
    try:
        if "WORLD_SIZE" in os.environ:                 # started by torchrun: this is one of its processes
            if args.nproc != 1:
                raise ValueError("under torchrun the process count is --nproc_per_node; drop --nproc")
            run(args.checkpoint, **kwargs)
        else:
            launch(args.checkpoint, args.nproc, **kwargs)
    except (ValueError, FloatingPointError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
