"""Training loop: ``TrainConfig`` describes a run, ``Trainer`` runs it, checkpoints it and resumes it exactly.

Reproducibility: one ``numpy.random.SeedSequence(seed)`` is split into four Generators - weight init, data
order, augmentation, dropout - and a checkpoint stores the last three, the optimizer and schedule state, the
counters and (mid-epoch) the epoch's data order. Resuming therefore replays the same batches, the same
augmentations and the same dropout masks: the final weights are bit-identical to an uninterrupted run.

The run folder (``runfolder.RunFolder``) belongs to one run and is locked while it trains. ``last.npz`` is there
from the start (step 0) and is rewritten at every epoch end, after ``best.npz`` when the epoch improved on the best
validation IoU: whatever kills the run, ``best.npz`` is the checkpoint ``last.npz`` names as the best, or a later
one of the same run that the resumed run writes again identically. Files are written atomically.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM, or a broken output pipe, asks the loop to stop at the next step
boundary; it then writes ``last.npz`` and raises ``runfolder.Interrupted`` (a ``KeyboardInterrupt``). A second
signal aborts a step (before its update), a validation or a figure at once: the trainer restores the state it had
at the start of the step (batch-norm statistics and Generators; weights only change in the update) and saves that.
Checkpoint writes are never cut short.

Divergence (``finite.TrainingDiverged``): a training loss that is NaN/Inf or ``LOSS_EXPLOSION`` times the first
step's, non-finite batch-norm statistics in a step, and at each epoch end a validation loss past the same limit or
a parameter, running statistic or optimizer state that is NaN/Inf or beyond ``finite.MAX_ABS_STATE``, stop the run.
No checkpoint ever holds such values: ``last.npz`` keeps the last state that passed.

On a GPU the training step and the validation forward replay CUDA graphs (``graph_step.py``; ``cuda_graph=False``
runs them eagerly): the same numbers to float rounding, checkpoints and resume as above. A replay cannot stop
midway, so there a second signal, too, stops after the step.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .backend import check_device, to_device, to_numpy
from .checkpoint import generator_state, load_checkpoint, save_checkpoint, set_generator_state
from .data import SYNTHETIC_DATA, DataLoader, FolderDataset, Subset, SyntheticShapes, train_transform
from .data.decode import VOID_CHOICES
from .data.run_data import check_data_fingerprint, dataset_fingerprint, folder_split
from .finite import NonFiniteError, TrainingDiverged, check_logits, unhealthy_arrays
from .losses import build_loss
from .metrics import COUNT_NAMES, BoundaryMeter, ConfusionMeter
from .models.densenet import min_input_size_for
from .nn import sigmoid
from .optim import build_optimizer, build_scheduler
from .runfolder import StopSignals, guarded_std_streams, new_run_id, run_id_of
from .train_run import HISTORY_FIELDS, RunKeeping  # noqa: F401 (HISTORY_FIELDS: part of this module's API)

MODELS = ("densenet121", "small")
LOSS_EXPLOSION = 1000.0     # a loss this many times the first step's (or 1000 when that was below 1) has diverged


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint as JSON).

    Args:
        data: "shapes" (SyntheticShapes), "shapes-fine" / "shapes-context" (its variants, docs/experiments.md) or
            a folder (``root/images`` + ``root/masks``, or ``root/train`` and ``root/val`` each with that layout; a
            single folder is split with ``val_fraction``). A relative folder is made absolute when
            the config is created, so a run resumes from any working directory.
        model: "densenet121" (DeepLabConfig defaults) or "small" (DeepLabConfig.small).
        output_stride, image_size, epochs, batch_size, lr, optimizer, weight_decay, scheduler, warmup_steps, loss:
            the usual; the schedule steps once per iteration.
        train_size, val_size: number of SyntheticShapes images (ignored for folders).
        augment: random scale + crop, flip and colour jitter on the training set.
        device: "cpu" or "cuda". seed: the run's single seed. threshold: for IoU/Dice.
        mask_void: what the void pixels of VOC-style masks become: "background", "object" or "error"
            (``minideeplab.data.decode``).
        cuda_graph: on "cuda", replay the training step and the validation forward as CUDA graphs (graph_step.py);
            False: run them eagerly. No effect on the CPU.
        backbone_weights: a torchvision DenseNet-121 ``.pth`` file loaded into the backbone before training
            (``io.import_torchvision_densenet121``; needs torch); a resumed run keeps its trained weights.
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
    mask_void: str = "background"
    cuda_graph: bool = True
    backbone_weights: str | None = None

    def __post_init__(self):
        data = os.fspath(self.data) if isinstance(self.data, (str, os.PathLike)) else None
        # a folder is stored absolute; a synthetic name stays, and so does a mistyped one ("shapes-thin", no such
        # folder), for validate() to name the synthetic sets
        if data is not None and data not in SYNTHETIC_DATA and (os.path.exists(data) or not data.startswith("shapes")):
            self.data = os.path.abspath(data)

    def validate(self) -> TrainConfig:
        """Raise ValueError with a clear message for an invalid setting; return self."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        need(self.model in MODELS, f"model must be one of {MODELS}, got {self.model!r}")
        need(not self.data.startswith("shapes") or self.data in SYNTHETIC_DATA,
             f"data {self.data!r}: the synthetic sets are {tuple(SYNTHETIC_DATA)} (a folder: ./{self.data})")
        need(self.output_stride in (8, 16, 32), f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        smallest = min_input_size_for(self.output_stride)      # 5, 13, 29 px: computed from the layers
        need(self.image_size >= smallest, f"image_size {self.image_size} is too small at output stride "
             f"{self.output_stride}: the network needs images of at least {smallest}x{smallest} pixels")
        need(self.mask_void in VOID_CHOICES, f"mask_void must be one of {VOID_CHOICES}, got {self.mask_void!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (batch norm needs two images), got {self.batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.train_size >= 1 and self.val_size >= 1, "train_size and val_size must be >= 1")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        need(self.backbone_weights is None or self.model == "densenet121",
             f"backbone_weights (torchvision's DenseNet-121) needs model 'densenet121', got {self.model!r}")
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


def build_datasets(cfg: TrainConfig, augment_rng: np.random.Generator, progress: bool | None = None):
    """The training set (augmented with ``augment_rng``) and the validation set (never augmented). Folders are
    decoded and checked file by file here (``FolderDataset.verify``), before any training step."""
    transform = train_transform(cfg.image_size) if cfg.augment else None
    if cfg.data in SYNTHETIC_DATA:
        variant = SYNTHETIC_DATA[cfg.data]
        return (SyntheticShapes(cfg.train_size, cfg.image_size, seed=cfg.seed, split=0, transform=transform,
                                rng=augment_rng, variant=variant),
                SyntheticShapes(cfg.val_size, cfg.image_size, seed=cfg.seed, split=1, variant=variant))
    root = Path(cfg.data)
    kw = {"mask_void": cfg.mask_void, "progress": progress}
    if (root / "train").is_dir() and (root / "val").is_dir():
        return (FolderDataset(root / "train", cfg.image_size, transform=transform, rng=augment_rng, **kw),
                FolderDataset(root / "val", cfg.image_size, **kw))
    train_all = FolderDataset(root, cfg.image_size, transform=transform, rng=augment_rng, **kw)
    val_all = FolderDataset(root, cfg.image_size, mask_void=cfg.mask_void, verify=False)
    val_all.records = train_all.records           # the same files, checked once
    train_idx, val_idx = folder_split(cfg, len(train_all), root)
    return Subset(train_all, train_idx), Subset(val_all, val_idx)


def evaluate(model, loader, loss_fn=None, threshold: float = 0.5, device: str = "cpu", progress: bool = False):
    """Metrics of ``model`` (put in eval mode) over ``loader``: IoU, Dice, precision, recall, accuracy, counts,
    Boundary IoU and trimap IoU (``metrics.BoundaryMeter``), and the mean ``loss`` when ``loss_fn`` is given. Raises
    ``finite.NonFiniteError`` when the logits are not finite (a diverged checkpoint).

    A ``Module`` runs under ``nn.no_grad`` (nothing kept for a backward: an activation is freed once the next layer
    has read it, and on the CPU the batch is split over the BLAS threads, ``nn.threads``); a captured eval step
    (``graph_step.CapturedEvalStep``) replays its graph as it is."""
    from tqdm import tqdm

    from .nn import Module, no_grad
    model.eval()
    meter, boundary, loss_sum, batches = ConfusionMeter(threshold), BoundaryMeter(threshold), 0.0, 0
    for images, masks in tqdm(loader, desc="validate", leave=False, disable=not progress):
        x, t = to_device(images, device), to_device(masks, device)
        with no_grad() if isinstance(model, Module) else nullcontext():
            logits = model(x)
        check_logits(logits)
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


def _load_backbone(model, path) -> None:
    """torchvision's DenseNet-121 weights from ``path`` into ``model.backbone``
    (``io.import_torchvision_densenet121``, whose errors name the file and what is wrong with it)."""
    from .io import import_torchvision_densenet121
    import_torchvision_densenet121(path, model)


class Trainer(RunKeeping):
    """Train a DeepLabV3 as ``TrainConfig`` says, writing ``history.csv``, ``last.npz``, ``best.npz``,
    ``curves.png`` and ``predictions.png`` into ``out_dir`` (nothing is written when it is None).

    Args:
        config: the run.
        out_dir: run folder (created; refused when it holds another run, see ``runfolder.RunFolder``).
        progress: show tqdm bars (loss and running IoU).
        log: called with one line per epoch (e.g. ``print``); None for silence (warnings then go to ``warnings``).
        figures: write the two PNG figures (a figure that cannot be written is a warning).
        log_every: also ``log`` a line every this many steps (0: only per epoch), for logs without a terminal.
        overwrite: replace the files of another run found in ``out_dir``.
        load_backbone: load ``config.backbone_weights`` (False when a checkpoint's weights follow: ``from_checkpoint``).
    """

    def __init__(self, config: TrainConfig, out_dir=None, progress: bool = True, log=None, figures: bool = True,
                 log_every: int = 0, overwrite: bool = False, load_backbone: bool = True):
        from .models import build_deeplab
        from .nn import Dropout
        self.cfg = config.validate()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.log, self.figures, self.log_every = progress, log, figures, int(log_every)
        self.overwrite, self.run_id, self.resumed_from = overwrite, new_run_id(), None
        init_seq, *seqs = np.random.SeedSequence(self.cfg.seed).spawn(4)
        self.rngs = dict(zip(("shuffle", "augment", "dropout"), (np.random.default_rng(s) for s in seqs)))
        self.train_set, self.val_set = build_datasets(self.cfg, self.rngs["augment"], None if progress else False)
        self.data_fingerprint = dataset_fingerprint(self.train_set, self.val_set)   # checked by load_state
        self.train_loader = DataLoader(self.train_set, self.cfg.batch_size, shuffle=True, rng=self.rngs["shuffle"],
                                       drop_last=True, prefetch=True)
        self.val_loader = DataLoader(self.val_set, self.cfg.batch_size)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set has {len(self.train_set)} images, fewer than one batch of "
                             f"{self.cfg.batch_size}; lower --batch-size")
        self.model = build_deeplab(self.cfg.model_config(), rng=np.random.default_rng(init_seq))
        if self.cfg.backbone_weights and load_backbone:
            _load_backbone(self.model, self.cfg.backbone_weights)
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
        # on a GPU the training step and the validation forward replay CUDA graphs (graph_step.py)
        self.captured = self.captured_eval = None
        if self.cfg.device == "cuda" and self.cfg.cuda_graph:
            from .graph_step import CapturedEvalStep, CapturedTrainStep
            self.captured = CapturedTrainStep(self.model, self.loss_fn, self.optimizer, self.scheduler,
                                              self.cfg.threshold)
            self.captured_eval = CapturedEvalStep(self.model)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.epoch_order = None
        self.history, self.best_iou, self.best_epoch, self.first_loss = [], -1.0, None, None
        self.last_val = None        # evaluate()'s dict of the latest validation in this process (None before one)
        self._reset_running()
        self.stop = StopSignals()   # stop requests (signals, broken pipe, request_stop); installed by fit()
        self._saved_at = None       # the position (_position()) of the run folder's last.npz, when known
        self.on_step_end = None     # optional callback(trainer) after every completed step (tests, notebooks)

    # -- state --------------------------------------------------------------------------------------------
    def _reset_running(self):
        self.running = {"loss_sum": 0.0, "count": 0, "seconds": 0.0}
        self.train_meter = ConfusionMeter(self.cfg.threshold)     # the epoch's training confusion counts

    def _position(self) -> tuple:
        return self.epoch, self.step_in_epoch, self.global_step

    def state_meta(self) -> dict:
        counts = {k: getattr(self.train_meter, k) for k in COUNT_NAMES}
        return {"train_config": self.cfg.to_dict(), "run_id": self.run_id, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "rng": {k: generator_state(g) for k, g in self.rngs.items()}, "history": self.history,
                "best_iou": self.best_iou, "best_epoch": self.best_epoch, "first_loss": self.first_loss,
                "running": {**self.running, **counts},
                "data_fingerprint": self.data_fingerprint}

    def save(self, path) -> None:
        """Atomic checkpoint of the whole training state (see the module docstring). Raises
        ``finite.TrainingDiverged`` instead of writing a state that holds NaN/Inf or exploded values."""
        problems = self._state_problems()
        if problems:
            raise TrainingDiverged(f"not writing {str(path)!r}: {'; '.join(problems[:3])}")
        self._write(path)

    def _write(self, path) -> None:
        extra = {"epoch_order": self.epoch_order} if self.epoch_order is not None else {}
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.state_meta(), extra)
        if self.out_dir is not None and Path(path) == self.out_dir / "last.npz":
            self._saved_at = self._position()

    def _state_problems(self) -> list:
        """What is NaN/Inf or exploded in the weights, buffers (finite.MAX_ABS_STATE) and optimizer state."""
        optimizer_state = ((f"optimizer {k}", v) for k, v in self.optimizer.state_dict().items())
        return unhealthy_arrays(self.model.state_dict().items()) + unhealthy_arrays(optimizer_state, bound=None)

    def load_state(self, ckpt) -> None:
        """Restore a checkpoint (a path or ``checkpoint.Checkpoint``) into this trainer."""
        ckpt = ckpt if hasattr(ckpt, "model_state") else load_checkpoint(ckpt)
        meta = ckpt.meta
        check_data_fingerprint(meta.get("data_fingerprint"), self.data_fingerprint, ckpt.path)
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
        self.run_id, self.first_loss = run_id_of(meta), meta.get("first_loss")
        # checkpoints from before best_epoch was stored: the first epoch that reached the best IoU (as '>' picks)
        self.best_epoch = meta.get("best_epoch") or next(
            (row["epoch"] for row in self.history if row["val_iou"] == self.best_iou), None)
        order = ckpt.extra.get("epoch_order")
        self.epoch_order = None if order is None else np.asarray(order, dtype=np.int64)

    @classmethod
    def from_checkpoint(cls, path, out_dir=None, device: str | None = None, **kwargs) -> Trainer:
        """A trainer that continues the run saved in ``path`` (its config comes from the checkpoint; ``path`` may
        also be a ``checkpoint.Checkpoint`` already loaded)."""
        ckpt = path if hasattr(path, "model_state") else load_checkpoint(path)
        path = ckpt.path
        if "train_config" not in ckpt.meta:
            raise ValueError(f"{str(path)!r} has no training config; it cannot be resumed")
        cfg = TrainConfig.from_dict(ckpt.meta["train_config"])
        if device is not None:
            cfg.device = device
        trainer = cls(cfg, out_dir=out_dir if out_dir is not None else Path(path).parent, load_backbone=False,
                      **kwargs)
        trainer.load_state(ckpt)
        trainer.resumed_from = Path(path)
        return trainer

    def _snapshot(self):
        if self.captured is not None:     # a captured step never stops mid-way: nothing of the model to roll back
            return {k: generator_state(g) for k, g in self.rngs.items()}, []
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
        """One optimisation step on a host batch; returns (loss, probabilities on the device), or (loss, None) when
        the step is captured (its confusion counts are then already in ``train_meter``)."""
        if self.captured is not None:     # one CUDA graph replay; Ctrl-C stops after it
            self.stop.in_abortable = False
            loss = self.captured(images, masks, self.train_meter)
            self._check_loss(loss)        # after the replay: the captured step has updated the weights already
            return loss, None
        x, t = to_device(images, self.cfg.device), to_device(masks, self.cfg.device)
        self.model.train()
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = float(self.loss_fn(logits, t))
        self._check_loss(loss)            # NaN, Inf or exploded: the run stops before this update
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.stop.in_abortable = False    # from here on a signal only asks to stop: an update is never cut short
        self.optimizer.step()
        self.scheduler.step()
        return loss, sigmoid(logits)

    def _check_loss(self, loss: float, what: str = "training loss") -> None:
        limit = LOSS_EXPLOSION * max(self.first_loss or 1.0, 1.0)
        if not math.isfinite(loss) or loss > limit:
            raise FloatingPointError(f"the {what} is {loss:.4g}" + (
                f", over {LOSS_EXPLOSION:g}x the first step's ({self.first_loss:.4g})" if math.isfinite(loss) else ""))

    def request_stop(self) -> None:
        """Stop after the current step as Ctrl-C does (saves last.npz, then raises ``runfolder.Interrupted``)."""
        self.stop.request("stop requested")

    def fit(self) -> list:
        """Train until ``epochs``; returns the history (one dict per epoch)."""
        with self.stop, guarded_std_streams(self._on_broken_pipe):
            folder = self._open_run_folder()
            try:
                while self.epoch < self.cfg.epochs:
                    self._train_epoch()
                    self._end_epoch()
                if self.stop.reason:
                    self._stopped()
                if self.figures and self.out_dir is not None:
                    self._figure("predictions.png", self.write_predictions)
            finally:
                if folder is not None:
                    folder.close()
        return self.history

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
                if self.stop.reason:
                    self._stopped()
                snap, start = self._snapshot(), time.perf_counter()
                try:
                    with self.stop.abortable():   # a second signal may cut this short: train_step ends it
                        batch = next(batches, None)
                        if batch is None:
                            break
                        loss, probs = self.train_step(*batch)
                except KeyboardInterrupt:
                    self._restore(snap)       # back to the clean state at the start of this step
                    self._stopped()
                except (FloatingPointError, NonFiniteError) as e:
                    self._restore(snap)
                    self._diverged(self._named(e))
                if probs is not None:
                    self.train_meter.update(probs, batch[1])
                r = self.running
                r["loss_sum"] += loss
                r["count"] += 1
                r["seconds"] += time.perf_counter() - start
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.step_in_epoch += 1
                self.global_step += 1
                bar.set_postfix(loss=f"{r['loss_sum'] / r['count']:.4f}", iou=f"{self._running_iou():.3f}")
                bar.update()
                if self.log and self.log_every and self.global_step % self.log_every == 0:
                    self._say(f"step {self.global_step}/{self.total_steps}: loss {r['loss_sum'] / r['count']:.4f} "
                              f"IoU {self._running_iou():.4f} lr {self.optimizer.lr:.2e} "
                              f"{r['seconds'] / r['count']:.2f} s/step")
                if self.on_step_end is not None:
                    self.on_step_end(self)

    def _running_iou(self) -> float:
        return self.train_meter.compute()["iou"] if self.train_meter.total else 1.0

    def _end_epoch(self):
        try:
            problems = self._state_problems()
            if problems:
                raise FloatingPointError("; ".join(problems[:3]))
            with self.stop.abortable():
                val = evaluate(self.captured_eval or self.model, self.val_loader, self.loss_fn, self.cfg.threshold, self.cfg.device,
                               progress=self.progress)
            self._check_loss(val["loss"], "validation loss")
        except KeyboardInterrupt:
            self._stopped()           # saves the epoch's training; its validation runs again on resume
        except (FloatingPointError, NonFiniteError) as e:
            self._diverged(f"{e} after epoch {self.epoch + 1}", at_epoch_end=True)
        self.last_val = val
        r = self.running
        row = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.lr,
               "train_loss": r["loss_sum"] / max(r["count"], 1), "train_iou": self._running_iou(),
               "val_loss": val["loss"], "seconds": round(r["seconds"], 2),
               **{f"val_{k}": val[k] for k in ("iou", "dice", "precision", "recall", "accuracy", "boundary_iou")}}
        self.history.append(row)
        self.epoch, self.epoch_order, self.step_in_epoch = self.epoch + 1, None, 0
        improved = row["val_iou"] > self.best_iou
        if improved:
            self.best_iou, self.best_epoch = row["val_iou"], row["epoch"]
        self._say(f"epoch {row['epoch']}/{self.cfg.epochs}: train loss {row['train_loss']:.4f} "
                  f"IoU {row['train_iou']:.4f} | val loss {row['val_loss']:.4f} IoU {row['val_iou']:.4f} "
                  f"Dice {row['val_dice']:.4f} | {row['seconds']:.0f} s")
        if self.out_dir is not None:
            if improved:                  # before the last.npz that records it (see the module docstring)
                self._write(self.out_dir / "best.npz")
            self._write(self.out_dir / "last.npz")
            self._write_history()
            if self.figures:
                from .plots import plot_curves
                self._figure("curves.png", lambda: plot_curves(self.history, self.out_dir / "curves.png"))

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
