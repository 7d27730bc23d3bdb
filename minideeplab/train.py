"""Training loop: ``TrainConfig`` describes a run, ``Trainer`` runs it, checkpoints it and resumes it exactly.

Reproducibility: one ``numpy.random.SeedSequence(seed)`` is split into four Generators - weight init, data
order, augmentation, dropout - and a checkpoint stores the last three, the optimizer and schedule state, the
counters and (mid-epoch) the epoch's data order. Resuming therefore replays the same batches, the same
augmentations and the same dropout masks: the final weights are bit-identical to an uninterrupted run.

Ctrl-C: the first SIGINT asks the loop to stop after the current step; it then writes ``last.npz`` at that clean
step boundary and raises ``KeyboardInterrupt``. A second Ctrl-C aborts the step at once; the trainer restores the
state it had at the start of the step (batch-norm statistics and Generators; weights only change in the
optimizer update, which is never interrupted) and saves that.
"""
from __future__ import annotations

import csv
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .backend import check_device, to_device, to_numpy
from .checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from .data import SYNTHETIC_DATA, DataLoader, FolderDataset, Subset, SyntheticShapes, train_transform
from .io import atomic_write
from .losses import build_loss
from .metrics import COUNT_NAMES, BoundaryMeter, ConfusionMeter
from .nn import sigmoid
from .optim import build_optimizer, build_scheduler

MODELS = ("densenet121", "small")
HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "train_iou", "val_loss", "val_iou", "val_dice",
                  "val_precision", "val_recall", "val_accuracy", "val_boundary_iou", "seconds")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint as JSON).

    Args:
        data: "shapes" (SyntheticShapes), "shapes-fine" / "shapes-context" (its variants, docs/experiments.md) or
            a folder (``root/images`` + ``root/masks``, or ``root/train`` and ``root/val`` each with that layout; a
            single folder is split with ``val_fraction``).
        model: "densenet121" (DeepLabConfig defaults) or "small" (DeepLabConfig.small).
        output_stride, image_size, epochs, batch_size, lr, optimizer, weight_decay, scheduler, warmup_steps, loss:
            the usual; the schedule steps once per iteration.
        train_size, val_size: number of SyntheticShapes images (ignored for folders).
        augment: random scale + crop, flip and colour jitter on the training set.
        device: "cpu" or "cuda". seed: the run's single seed. threshold: for IoU/Dice.
    """
    data: str = "shapes"
    model: str = "densenet121"
    output_stride: int = 16
    image_size: int = 96
    epochs: int = 4
    batch_size: int = 8
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    scheduler: str = "poly"
    warmup_steps: int = 10
    loss: str = "bce+dice"
    train_size: int = 400
    val_size: int = 48
    val_fraction: float = 0.2
    augment: bool = True
    device: str = "cpu"
    seed: int = 0
    threshold: float = 0.5

    def validate(self) -> TrainConfig:
        """Raise ValueError with a clear message for an invalid setting; return self."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        need(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        need(not self.data.startswith("shapes") or self.data in SYNTHETIC_DATA,
             f"data {self.data!r}: the synthetic sets are {tuple(SYNTHETIC_DATA)} (a folder: ./{self.data})")
        need(self.output_stride in (8, 16, 32), f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        need(self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (batch norm needs two images), got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.train_size >= 1 and self.val_size >= 1, "train_size and val_size must be >= 1")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        check_device(self.device)
        build_loss(self.loss)                 # unknown names raise ValueError listing the choices
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def model_config(self):
        from .models import DeepLabConfig
        base = DeepLabConfig.small if self.model == "small" else DeepLabConfig
        return base(output_stride=self.output_stride)


def build_datasets(cfg: TrainConfig, augment_rng: np.random.Generator):
    """The training set (augmented with ``augment_rng``) and the validation set (never augmented)."""
    transform = train_transform(cfg.image_size) if cfg.augment else None
    if cfg.data in SYNTHETIC_DATA:
        variant = SYNTHETIC_DATA[cfg.data]
        return (SyntheticShapes(cfg.train_size, cfg.image_size, seed=cfg.seed, split=0, transform=transform,
                                rng=augment_rng, variant=variant),
                SyntheticShapes(cfg.val_size, cfg.image_size, seed=cfg.seed, split=1, variant=variant))
    root = Path(cfg.data)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return (FolderDataset(root / "train", cfg.image_size, transform=transform, rng=augment_rng),
                FolderDataset(root / "val", cfg.image_size))
    train_all = FolderDataset(root, cfg.image_size, transform=transform, rng=augment_rng)
    n = len(train_all)
    if n < 2:
        raise ValueError(f"dataset {str(root)!r} has {n} image; need at least 2 to split into train and validation")
    order = np.random.default_rng([cfg.seed, 7]).permutation(n)
    n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    return Subset(train_all, order[n_val:]), Subset(FolderDataset(root, cfg.image_size), order[:n_val])


def evaluate(model, loader, loss_fn=None, threshold: float = 0.5, device: str = "cpu", progress: bool = False):
    """Metrics of ``model`` (put in eval mode) over ``loader``: IoU, Dice, precision, recall, accuracy, counts,
    Boundary IoU and trimap IoU (``metrics.BoundaryMeter``), and the mean ``loss`` when ``loss_fn`` is given."""
    from tqdm import tqdm
    model.eval()
    meter, boundary, loss_sum, batches = ConfusionMeter(threshold), BoundaryMeter(threshold), 0.0, 0
    for images, masks in tqdm(loader, desc="validate", leave=False, disable=not progress):
        x, t = to_device(images, device), to_device(masks, device)
        logits = model(x)
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, t))
        probs = sigmoid(logits)
        meter.update(probs, t)
        boundary.update(probs, t)
        batches += 1
    out = {**meter.compute(), **boundary.compute()}
    if loss_fn is not None:
        out["loss"] = loss_sum / max(batches, 1)
    return out


def _write_history(path: Path, history: list) -> None:
    with atomic_write(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        w.writeheader()
        w.writerows({k: row.get(k, "") for k in HISTORY_FIELDS} for row in history)


class Trainer:
    """Train a DeepLabV3 as ``TrainConfig`` says, writing ``history.csv``, ``last.npz``, ``best.npz``,
    ``curves.png`` and ``predictions.png`` into ``out_dir`` (nothing is written when it is None).

    Args:
        config: the run.
        out_dir: run folder (created).
        progress: show tqdm bars (loss and running IoU).
        log: called with one line per epoch (e.g. ``print``); None for silence.
        figures: write the two PNG figures.
        log_every: also ``log`` a line every this many steps (0: only per epoch), for logs without a terminal.
    """

    def __init__(self, config: TrainConfig, out_dir=None, progress: bool = True, log=None, figures: bool = True,
                 log_every: int = 0):
        from .models import build_deeplab
        from .nn import Dropout
        self.cfg = config.validate()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.log, self.figures, self.log_every = progress, log, figures, int(log_every)
        init_seq, *seqs = np.random.SeedSequence(self.cfg.seed).spawn(4)
        self.rngs = dict(zip(("shuffle", "augment", "dropout"), (np.random.default_rng(s) for s in seqs)))
        self.train_set, self.val_set = build_datasets(self.cfg, self.rngs["augment"])
        self.train_loader = DataLoader(self.train_set, self.cfg.batch_size, shuffle=True, rng=self.rngs["shuffle"],
                                       drop_last=True)
        self.val_loader = DataLoader(self.val_set, self.cfg.batch_size)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set has {len(self.train_set)} images, fewer than one batch of "
                             f"{self.cfg.batch_size}; lower --batch-size")
        self.model = build_deeplab(self.cfg.model_config(), rng=np.random.default_rng(init_seq))
        for m in self.model.modules():        # every stochastic layer draws from the checkpointed Generator
            if isinstance(m, Dropout):
                m.rng = self.rngs["dropout"]
        self.model.to(self.cfg.device)
        self.loss_fn = build_loss(self.cfg.loss)
        self.optimizer = build_optimizer(self.cfg.optimizer, self.model.parameters(), self.cfg.lr,
                                         weight_decay=self.cfg.weight_decay)
        self.total_steps = self.cfg.epochs * len(self.train_loader)
        self.scheduler = build_scheduler(self.cfg.scheduler, self.optimizer, self.total_steps,
                                         warmup_steps=min(self.cfg.warmup_steps, self.total_steps - 1))
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_order = None
        self.history, self.best_iou = [], -1.0
        self.last_val = None        # evaluate()'s dict of the latest validation in this process (None before one)
        self._reset_running()
        self._stop_requested = self._in_update = False
        self.on_step_end = None     # optional callback(trainer) after every completed step (tests, notebooks)

    # -- state --------------------------------------------------------------------------------------------
    def _reset_running(self):
        self.running = {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
        self.train_meter = ConfusionMeter(self.cfg.threshold)     # the epoch's training confusion counts

    def state_meta(self) -> dict:
        counts = {k: getattr(self.train_meter, k) for k in COUNT_NAMES}
        return {"train_config": self.cfg.to_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "rng": {k: generator_state(g) for k, g in self.rngs.items()},
                "history": self.history, "best_iou": self.best_iou, "running": {**self.running, **counts}}

    def save(self, path) -> None:
        """Atomic checkpoint of the whole training state (see the module docstring)."""
        extra = {"epoch_order": self.epoch_order} if self.epoch_order is not None else {}
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.state_meta(), extra)

    def load_state(self, ckpt) -> None:
        """Restore a checkpoint (a path or ``checkpoint.Checkpoint``) into this trainer."""
        ckpt = ckpt if hasattr(ckpt, "model_state") else load_checkpoint(ckpt)
        meta = ckpt.meta
        try:
            self.model.load_state_dict(ckpt.model_state)
            self.optimizer.load_state_dict(ckpt.optimizer_state)
            self.scheduler.load_state_dict(ckpt.scheduler_state)
            for k, g in self.rngs.items():
                set_generator_state(g, meta["rng"][k])
            self.epoch, self.step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
            self.global_step = int(meta["global_step"])
            self.history, self.best_iou = list(meta["history"]), float(meta["best_iou"])
            self.running = dict(meta["running"])
            for k in COUNT_NAMES:
                setattr(self.train_meter, k, int(self.running.pop(k)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{ckpt.path!r}: incomplete training checkpoint (missing {e})") from None
        order = ckpt.extra.get("epoch_order")
        self.epoch_order = None if order is None else np.asarray(order, dtype=np.int64)

    @classmethod
    def from_checkpoint(cls, path, out_dir=None, device: str | None = None, **kwargs) -> Trainer:
        """A trainer that continues the run saved in ``path`` (its config comes from the checkpoint)."""
        ckpt = load_checkpoint(path)
        if "train_config" not in ckpt.meta:
            raise ValueError(f"{str(path)!r} has no training config; it cannot be resumed")
        cfg = TrainConfig.from_dict(ckpt.meta["train_config"])
        if device is not None:
            cfg.device = device
        trainer = cls(cfg, out_dir=out_dir if out_dir is not None else Path(path).parent, **kwargs)
        trainer.load_state(ckpt)
        return trainer

    def _snapshot(self):
        return ({k: generator_state(g) for k, g in self.rngs.items()},
                [(m, k, b.copy()) for m in self.model.modules() for k, b in m._buffers.items() if b is not None])

    def _restore(self, snap):
        states, buffers = snap
        for k, g in self.rngs.items():
            set_generator_state(g, states[k])
        for m, k, b in buffers:
            m._buffers[k][...] = b

    # -- the loop -----------------------------------------------------------------------------------------
    def train_step(self, images, masks):
        """One optimisation step on a host batch; returns (loss, probabilities on the device)."""
        x, t = to_device(images, self.cfg.device), to_device(masks, self.cfg.device)
        self.model.train()
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = float(self.loss_fn(logits, t))
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.global_step}; lower --lr")
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self._in_update = True            # from here on Ctrl-C only sets the stop flag
        self.optimizer.step()
        self.scheduler.step()
        return loss, sigmoid(logits)

    def _on_sigint(self, signum, frame):
        if self._stop_requested and not self._in_update:
            raise KeyboardInterrupt
        self._stop_requested = True
        if self.log:
            self.log("\ninterrupt: stopping after this step and saving last.npz (Ctrl-C again to abort the step)")

    def request_stop(self) -> None:
        """Stop after the current step as Ctrl-C does (saves last.npz, then raises KeyboardInterrupt)."""
        self._stop_requested = True

    def fit(self) -> list:
        """Train until ``epochs``; returns the history (one dict per epoch)."""
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        handler_installed = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handler_installed else None
        try:
            while self.epoch < self.cfg.epochs:
                self._train_epoch()
                self._end_epoch()
            if self.figures and self.out_dir is not None:
                self.write_predictions()
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
        return self.history

    def _interrupted(self):
        if self.out_dir is not None:
            self.save(self.out_dir / "last.npz")
            if self.log:
                self.log(f"saved {self.out_dir / 'last.npz'} at step {self.global_step}; continue with "
                         f"--resume {self.out_dir / 'last.npz'}")
        raise KeyboardInterrupt

    def _train_epoch(self):
        from tqdm import tqdm
        if self.epoch_order is None:
            self.epoch_order, self.step_in_epoch = self.train_loader.epoch_order(), 0
            self._reset_running()
        bar = tqdm(total=len(self.train_loader), initial=self.step_in_epoch, leave=False,
                   desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", disable=not self.progress)
        batches = self.train_loader.batches(self.epoch_order, self.step_in_epoch)
        with bar:
            while True:
                if self._stop_requested:
                    self._interrupted()
                snap, start = self._snapshot(), time.perf_counter()
                try:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    loss, probs = self.train_step(*batch)
                except KeyboardInterrupt:
                    if self._in_update:       # cannot happen through our handler; be safe anyway
                        raise
                    self._restore(snap)       # back to the clean state at the start of this step
                    self._interrupted()
                self.train_meter.update(probs, batch[1])
                r = self.running
                r["loss_sum"] += loss
                r["count"] += 1
                r["seconds"] += time.perf_counter() - start
                self.step_in_epoch += 1
                self.global_step += 1
                self._in_update = False
                bar.set_postfix(loss=f"{r['loss_sum'] / r['count']:.4f}", iou=f"{self._running_iou():.3f}")
                bar.update()
                if self.log and self.log_every and self.global_step % self.log_every == 0:
                    self.log(f"step {self.global_step}/{self.total_steps}: loss {r['loss_sum'] / r['count']:.4f} "
                             f"IoU {self._running_iou():.4f} lr {self.optimizer.lr:.2e} "
                             f"{r['seconds'] / r['count']:.2f} s/step")
                if self.on_step_end is not None:
                    self.on_step_end(self)

    def _running_iou(self) -> float:
        return self.train_meter.compute()["iou"] if self.train_meter.total else 1.0

    def _end_epoch(self):
        val = self.last_val = evaluate(self.model, self.val_loader, self.loss_fn, self.cfg.threshold,
                                       self.cfg.device, progress=self.progress)
        r = self.running
        row = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.lr,
               "train_loss": r["loss_sum"] / max(r["count"], 1), "train_iou": self._running_iou(),
               "val_loss": val["loss"], "seconds": round(r["seconds"], 2),
               **{f"val_{k}": val[k] for k in ("iou", "dice", "precision", "recall", "accuracy", "boundary_iou")}}
        self.history.append(row)
        self.epoch, self.epoch_order, self.step_in_epoch = self.epoch + 1, None, 0
        if self.log:
            self.log(f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} "
                     f"IoU {row['train_iou']:.4f} | val loss {row['val_loss']:.4f} IoU {row['val_iou']:.4f} "
                     f"Dice {row['val_dice']:.4f} | {row['seconds']:.0f} s")
        improved = row["val_iou"] > self.best_iou
        self.best_iou = max(self.best_iou, row["val_iou"])
        if self.out_dir is not None:
            self.save(self.out_dir / "last.npz")
            if improved:
                self.save(self.out_dir / "best.npz")
            _write_history(self.out_dir / "history.csv", self.history)
            if self.figures:
                from .plots import plot_curves
                plot_curves(self.history, self.out_dir / "curves.png")

    def write_predictions(self, path=None) -> Path:
        """``predictions.png`` for the first validation batch (up to 4 images)."""
        from .plots import plot_predictions
        images, masks = next(iter(self.val_loader))
        images, masks = images[:4], masks[:4]
        self.model.eval()
        probs = to_numpy(sigmoid(self.model(to_device(images, self.cfg.device))))
        path = Path(path) if path is not None else self.out_dir / "predictions.png"
        plot_predictions(images, masks, probs, path, self.cfg.threshold)
        return path
